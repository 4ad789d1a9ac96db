"""settle pending chat turns whose generation already ended

Until now a pending assistant turn whose job ended without filling it in was repaired when the
chat was read. Job outcomes and chat turns are now written in one transaction (db.jobs.finish),
so reads never write; this settles the rows left pending by the old code, once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:30:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        UPDATE chat_messages
        SET status = CASE (SELECT j.status FROM jobs j WHERE j.id = chat_messages.job_id)
                         WHEN 'cancelled' THEN 'cancelled' ELSE 'failed' END,
            error = COALESCE((SELECT j.error FROM jobs j WHERE j.id = chat_messages.job_id),
                             'the generation ended without a reply')
        WHERE status = 'pending'
          AND job_id IN (SELECT id FROM jobs WHERE status IN ('failed', 'cancelled', 'succeeded'))
    """)


def downgrade() -> None:
    pass  # the settled turns stay settled
