"""chat_messages.follows_approved: whether a grounded reply was held to the approved answers it was shown
(the copy bias and the length floor), or written in the model's own words because no approved answer's
message is close to the customer's (``ml.memory.grounding.follows_approved``); NULL for a reply that was
not grounded (an ungrounded model, a lookup, no answer memory) and for turns stored before this revision

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 08:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('chat_messages') as batch:
        batch.add_column(sa.Column('follows_approved', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('chat_messages') as batch:
        batch.drop_column('follows_approved')
