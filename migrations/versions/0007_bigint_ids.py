"""row ids as BIGINT on PostgreSQL (SQLite's INTEGER ids are 64-bit already: nothing to do there)

Every id the API accepts may be up to 2**63-1 (db.ids.MAX_ID); an INTEGER column on PostgreSQL refuses
anything past 2**31-1 ("integer out of range") instead of finding no row.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 22:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> its id columns (the primary key first, then the columns that hold other rows' ids)
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    'datasets': ('id',),
    'dataset_examples': ('id', 'dataset_id'),
    'jobs': ('id', 'parent_id', 'dataset_id'),
    'job_events': ('id', 'job_id'),
    'models': ('id', 'train_job_id', 'dataset_id'),
    'evaluations': ('id', 'job_id', 'dataset_id'),
    'evaluation_examples': ('id', 'evaluation_id', 'model_id', 'example_id'),
    'chat_sessions': ('id',),
    'chat_messages': ('id', 'chat_id', 'job_id', 'memory_entry_id'),
    'memory_entries': ('id', 'dataset_id', 'example_id', 'chat_message_id'),
    'throughput_measurements': ('id', 'job_id'),
    'api_keys': ('id',),
}


def _retype(new: type[sa.Integer], old: type[sa.Integer], sequence_type: str) -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table, columns in ID_COLUMNS.items():
        for column in columns:
            op.alter_column(table, column, type_=new(), existing_type=old())
        op.execute(f"ALTER SEQUENCE {table}_id_seq AS {sequence_type}")


def upgrade() -> None:
    _retype(sa.BigInteger, sa.Integer, 'bigint')


def downgrade() -> None:
    _retype(sa.Integer, sa.BigInteger, 'integer')
