"""training estimates: each example's prompt/reply token counts, and measured training throughput

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('dataset_examples') as batch:
        batch.add_column(sa.Column('prompt_tokens', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('reply_tokens', sa.Integer(), nullable=True))
    op.create_table('throughput_measurements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('base_model', sa.Text(), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('precision', sa.String(length=16), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('tokens_per_second', sa.Float(), nullable=False),
    sa.Column('step_seconds', sa.Float(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_throughput_lookup', 'throughput_measurements', ['method', 'measured_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_throughput_lookup', table_name='throughput_measurements')
    op.drop_table('throughput_measurements')
    with op.batch_alter_table('dataset_examples') as batch:
        batch.drop_column('reply_tokens')
        batch.drop_column('prompt_tokens')
