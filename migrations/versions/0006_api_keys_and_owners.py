"""named API keys with roles; owners on models and evaluations

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 17:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
    with op.batch_alter_table('evaluations') as batch:
        batch.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
    # owners so far were fingerprints of the one CSRA_API_KEY, not key names: what was made before named keys
    # existed has no owner (admins see it; no agent does)
    for table in ('jobs', 'datasets', 'chat_sessions'):
        op.execute(f"UPDATE {table} SET owner = NULL")


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN in place (SQLite >= 3.35): a batch copy-and-rename would drop the old
    # table with foreign keys on, cascading into evaluation_examples
    with op.batch_alter_table('evaluations', recreate='never') as batch:
        batch.drop_column('owner')
    with op.batch_alter_table('models', recreate='never') as batch:
        batch.drop_column('owner')
    op.drop_table('api_keys')
