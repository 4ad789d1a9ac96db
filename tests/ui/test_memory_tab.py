"""The Memory tab's handlers without a browser: the summary line, a search, the pages of entries, removing
one and a rebuild. HTTP is stubbed with an ``httpx.MockTransport`` that plays the API's memory endpoints
(its answers have the API's shapes); the tab's own code runs unchanged. The browser test against the real
stack is ``tests/ui/test_ui_browser.py::test_the_memory_tab_finds_and_removes_a_wrong_approval``."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import httpx
import pandas as pd
import pytest

from csra.client import Client
from ui.tabs import memory


def entry(i: int, source: str = "dataset") -> dict[str, Any]:
    return {"id": i, "message": f"question {i}", "reply": f"answer {i}", "intent": "cancel_order",
            "category": "ORDER", "source": source, "dataset_id": 2 if source == "dataset" else None,
            "chat_message_id": 90 + i if source == "chat" else None, "created_at": "2026-12-05T10:11:12.345"}


class FakeMemory:
    def __init__(self, n: int) -> None:
        self.entries = [entry(i, "chat" if i % 10 == 0 else "dataset") for i in range(1, n + 1)]
        self.rebuilt: list[int] = []
        self.agent = False
        self.job: dict[str, Any] = {"id": 7, "kind": "memory", "status": "queued", "progress": 0.0, "stage": "",
                                    "eta_seconds": None, "error": None, "attempts": 1, "finished": False}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, q = request.url.path, request.url.params
        if path == "/memory":
            chat = sum(e["source"] == "chat" for e in self.entries)
            return httpx.Response(200, json={"entries": len(self.entries), "datasets": [2] if self.entries else [],
                                             "by_source": {"dataset": len(self.entries) - chat, "chat": chat},
                                             "embedder_ready": True})
        if path == "/memory/search":
            hits = [{**e, "similarity": 1 - i / 10} for i, e in enumerate(self.entries[: int(q["k"])])]
            return httpx.Response(200, json={"query": q["q"], "intent": "cancel_order", "intent_confidence": 0.87,
                                             "data": hits})
        if path == "/memory/entries" and self.agent:
            return httpx.Response(403, json={"detail": "admin only: this key's role is agent"})
        if path == "/memory/entries":
            chosen = [e for e in self.entries if q.get("source") in (None, e["source"])]
            start = int(q["offset"])
            return httpx.Response(200, json={"data": chosen[start: start + int(q["limit"])], "count": len(chosen)})
        if path.startswith("/memory/entries/") and request.method == "DELETE":
            i = int(path.rsplit("/", 1)[1])
            if not any(e["id"] == i for e in self.entries):
                return httpx.Response(404, json={"detail": f"memory entry {i} was already removed"})
            self.entries = [e for e in self.entries if e["id"] != i]
            return httpx.Response(204)
        if path == "/jobs/7":
            return httpx.Response(200, json=self.job)
        if path == "/memory/rebuild":
            dataset_id = json.loads(request.content)["dataset_id"]
            if dataset_id == 99:
                return httpx.Response(422, json={"detail": "dataset 99 does not exist"})
            self.rebuilt.append(dataset_id)
            return httpx.Response(202, json=self.job)
        return httpx.Response(404, json={"detail": "Not Found"})


@pytest.fixture()
def api(monkeypatch: pytest.MonkeyPatch) -> FakeMemory:
    fake = FakeMemory(45)
    c = Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(fake))
    monkeypatch.setattr(memory, "client", lambda: c)
    return fake


def test_the_summary_says_how_many_and_from_where(api: FakeMemory) -> None:
    assert memory.load_stats() == "**45 approved answers**: 41 from datasets (#2), 4 approved in chats."
    api.entries = []
    assert memory.load_stats().startswith("**The answer memory is empty.**")


def test_a_search_lists_the_answers_most_similar_first_with_the_intent(api: FakeMemory) -> None:
    hits, line = memory.search("  I want to cancel  ", 3)
    assert list(hits["id"]) == [1, 2, 3] and list(hits["similarity"]) == [1.0, 0.9, 0.8]
    assert hits.iloc[0]["approved answer"] == "answer 1" and hits.iloc[0]["source"] == "dataset #2"
    assert line == "**Intent:** cancel_order (confidence 0.87) · 3 answer(s), most similar first"
    with pytest.raises(gr.Error, match="Type a customer message"):
        memory.search("  ", 3)


def test_entries_come_a_page_at_a_time_and_a_page_past_the_end_is_the_last(api: FakeMemory) -> None:
    table, info, page = memory.browse("all", 2)
    assert list(table["id"]) == list(range(21, 41)) and page == 2
    assert info == "entries 21-40 of 45 · page 2 of 3"
    table, info, page = memory.browse("all", 9)
    assert list(table["id"]) == [41, 42, 43, 44, 45] and page == 3 and info.endswith("page 3 of 3")
    table, info, page = memory.browse("chat", 1)
    assert list(table["source"]) == ["chat reply #100", "chat reply #110", "chat reply #120", "chat reply #130"]


def test_removing_an_entry_updates_the_summary_and_the_page(api: FakeMemory) -> None:
    hits, _ = memory.search("question 45", 5)
    stats, table, info, page, picked, left = memory.remove("45", "all", 3, pd.concat([hits, memory.hits_frame(
        [{**api.entries[-1], "similarity": 1.0}])]))
    assert 45 not in list(table["id"]) and info == "entries 41-44 of 44 · page 3 of 3" and picked == ""
    assert list(left["id"]) == [1, 2, 3, 4, 5]  # the search's answers without the removed one
    assert stats.startswith("**44 approved answers**")
    with pytest.raises(gr.Error, match="already removed"):  # the API's 404 detail, as it is
        memory.remove("#45", "all", 3)
    with pytest.raises(gr.Error, match="Click the entry"):
        memory.remove(" ", "all", 1)
    with pytest.raises(gr.Error, match="'4x' is not a number"):
        memory.remove("4x", "all", 1)


def test_a_rebuild_starts_a_job_that_is_followed_and_a_bad_dataset_is_the_api_s_detail(api: FakeMemory) -> None:
    job_id, line, timer = memory.rebuild(2)
    assert api.rebuilt == [2] and job_id == 7 and "memory job #7" in line and "approved in chats stay" in line
    assert timer.active
    api.job = {**api.job, "status": "running", "progress": 0.5, "stage": "embedded 30/60 answers"}
    line, stats, timer = memory.follow_rebuild(7)
    assert "embedded 30/60 answers" in line and timer.active and stats == gr.skip()
    api.job = {**api.job, "status": "succeeded", "progress": 1.0, "finished": True}
    line, stats, timer = memory.follow_rebuild(7)
    assert "succeeded" in line and stats.startswith("**45 approved answers**") and not timer.active
    with pytest.raises(gr.Error, match="dataset 99 does not exist"):
        memory.rebuild(99)
    with pytest.raises(gr.Error, match="Pick the dataset"):
        memory.rebuild(None)


def test_an_agent_s_key_lists_nothing_and_is_told_why_without_an_error(api: FakeMemory) -> None:
    api.agent = True
    table, info, page = memory.browse("all", 1)
    assert table.empty and page == 1 and "take an admin's key" in info
