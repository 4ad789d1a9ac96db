"""What the database stores is the same on SQLite and PostgreSQL: ids up to 2**63-1, text with NUL
characters, strings longer than their column, JSON with NaN."""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import migrate
from db.ids import MAX_ID
from db.jobs import new_job
from db.models import ChatSession, Dataset, DatasetExample, Job
from db.session import make_engine


def test_ids_up_to_max_id_find_no_row_or_their_row(url):
    migrate.upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s:
        assert s.get(Job, MAX_ID) is None and s.get(Job, 2**40) is None
        job = Job(id=2**40, kind="import", queue="default", params={})
        s.add(job)
        s.commit()
        assert s.scalar(select(Job.id).where(Job.id == 2**40)) == 2**40
        assert s.scalars(select(Job).offset(MAX_ID).limit(MAX_ID)).all() == []
    engine.dispose()


def test_text_nul_long_strings_and_non_finite_json_are_stored(url):
    migrate.upgrade(url)
    engine = make_engine(url)
    with Session(engine) as s:
        chat = ChatSession(title="a\x00b" + "t" * 300, settings={"loss": math.nan, "ok": [1.5, math.inf]})
        ds = Dataset(name="d", source="x")
        s.add_all([chat, ds])
        s.flush()
        s.add(DatasetExample(dataset_id=ds.id, split="train", instruction="hi\x00", input="", output="o",
                             intent="i" * 150, category="c", flags=""))
        job = new_job(s, "import", {"loss": math.nan})
        s.commit()
        s.expire_all()
        chat = s.get(ChatSession, chat.id)
        assert chat is not None and len(chat.title) == 200 and chat.title.startswith("a")
        ex = s.scalars(select(DatasetExample)).one()
        assert len(ex.intent) == 100 and ex.instruction.startswith("hi")
        stored = s.get(Job, job.id)
        assert stored is not None
        loss = stored.params["loss"]
        assert loss is None or math.isnan(loss)  # PostgreSQL's json has no NaN: stored as null
    engine.dispose()
