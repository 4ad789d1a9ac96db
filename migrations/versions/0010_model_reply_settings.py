"""models.reply_settings: a grounded model's reply settings set after training (``PUT /models/{ref}/
reply-settings``: copy bias, copy exemplars, length floor, consensus pool, loop guard, minimum similarity),
each in place of the value in ``training_config.grounding``, which keeps what the model was trained with;
NULL: none set

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 13:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('reply_settings', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('reply_settings')
