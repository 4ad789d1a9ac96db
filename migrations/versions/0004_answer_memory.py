"""the answer memory: memory_entries, chat turns' intent / similar answers / slot warnings, and the
built-in "retrieval" responder

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00
"""
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('memory_entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('reply', sa.Text(), nullable=False),
    sa.Column('intent', sa.String(length=100), nullable=False),
    sa.Column('category', sa.String(length=100), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('example_id', sa.Integer(), nullable=True),
    sa.Column('chat_message_id', sa.Integer(), nullable=True),
    sa.Column('group_key', sa.Text(), nullable=False),
    sa.Column('message_vec', sa.LargeBinary(), nullable=False),
    sa.Column('reply_vec', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['chat_message_id'], ['chat_messages.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_memory_dataset', 'memory_entries', ['dataset_id'], unique=False)
    op.create_index('ix_memory_removed', 'memory_entries', ['removed_at'], unique=False)
    with op.batch_alter_table('chat_messages') as batch:
        batch.add_column(sa.Column('intent', sa.String(length=100), nullable=True))
        batch.add_column(sa.Column('intent_confidence', sa.Float(), nullable=True))
        batch.add_column(sa.Column('similar', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('slot_warnings', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('memory_entry_id', sa.Integer(), nullable=True))
    models = sa.table('models', sa.column('name', sa.String), sa.column('kind', sa.String),
                      sa.column('base_model', sa.String), sa.column('path', sa.Text),
                      sa.column('created_at', sa.DateTime(timezone=True)))
    exists = op.get_bind().execute(sa.text("SELECT 1 FROM models WHERE name = 'retrieval'")).first()
    if exists is None:
        op.bulk_insert(models, [{"name": "retrieval", "kind": "retrieval", "path": "",
                                 "base_model": "the nearest approved answer (answer memory; no model)",
                                 "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.execute("DELETE FROM models WHERE name = 'retrieval' AND kind = 'retrieval'")
    with op.batch_alter_table('chat_messages') as batch:
        for column in ('memory_entry_id', 'slot_warnings', 'similar', 'intent_confidence', 'intent'):
            batch.drop_column(column)
    op.drop_index('ix_memory_removed', table_name='memory_entries')
    op.drop_index('ix_memory_dataset', table_name='memory_entries')
    op.drop_table('memory_entries')
