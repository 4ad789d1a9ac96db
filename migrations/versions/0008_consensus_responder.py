"""the built-in "retrieval-consensus" responder: of the 8 nearest approved answers (those of the nearest
one's intent), the one the others agree on most, no model (``ml.memory.grounding.choose_answers``)

On Bitext's test split it beats "retrieval" (the nearest answer) on ROUGE-L, BLEU, chrF and semantic
similarity (README, "Following it harder"), so the bar a model has to beat is on the board.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 05:00:00
"""
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "retrieval-consensus"


def upgrade() -> None:
    models = sa.table('models', sa.column('name', sa.String), sa.column('kind', sa.String),
                      sa.column('base_model', sa.String), sa.column('path', sa.Text),
                      sa.column('training_config', sa.JSON), sa.column('created_at', sa.DateTime(timezone=True)))
    exists = op.get_bind().execute(sa.text("SELECT 1 FROM models WHERE name = :name"), {"name": NAME}).first()
    if exists is None:  # a model of the user's own under that name keeps it (the responder is then absent)
        op.bulk_insert(models, [{"name": NAME, "kind": "retrieval", "path": "",
                                 "base_model": "the approved answer the 8 nearest agree on (answer memory; no model)",
                                 "training_config": {"consensus_pool": 8}, "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM models WHERE name = :name AND kind = 'retrieval'").bindparams(name=NAME))
