"""The UI's streaming handlers without a browser: the Chat tab's ``follow_replies`` and the Compare
tab's ``stream_side`` read a job's server-sent events through ``csra.client`` (HTTP stubbed with an
``httpx.MockTransport``) and yield what the page shows."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import httpx
import pytest

from csra.client import Client
from ui.tabs import chat, compare


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {e}\r\ndata: {json.dumps(d)}\r\n\r\n" for e, d in events).encode()


def message(status: str, content: str = "", **extra: Any) -> dict[str, Any]:
    return {"id": 2, "role": "assistant", "status": status, "content": content, "job_id": 7, "settings": {},
            "model_name": "baseline", **extra}


USER = {"id": 1, "role": "user", "content": "Where is my order?", "status": "done"}


def use_api(monkeypatch: pytest.MonkeyPatch, routes: dict[str, Any]) -> None:
    """The tabs' client answers GET ``path`` with ``routes[path]`` (bytes: an event stream)."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = routes[request.url.path]
        if isinstance(body, bytes):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
        return httpx.Response(200, json=body)

    api = Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(handler))
    for module in (chat, compare):
        monkeypatch.setattr(module, "client", lambda: api)


def test_chat_reply_streams_restarts_on_reset_and_ends_as_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = message("done", "Hi, order {{Order Number}} ships today.", latency_ms=900, prompt_tokens=12,
                     completion_tokens=9)
    use_api(monkeypatch, {
        "/jobs/7/stream": sse(("token", {"text": "Hel"}), ("reset", {"attempt": 2}), ("token", {"text": "Hi,"}),
                              ("token", {"text": " order"}), ("done", {"id": 7, "status": "succeeded"})),
        "/chats/1": {"id": 1, "messages": [USER, stored]},
    })
    pending = {"id": 1, "messages": [USER, message("pending")]}

    shown = [(bot[-1]["content"], meta) for _, bot, meta in chat.follow_replies(pending)]

    assert [text for text, _ in shown] == [
        "Hel ▌", "⏳ _generating…_", "Hi, ▌", "Hi, order ▌", "Hi, order {{Order Number}} ships today."
    ]
    assert "generating (job #7)" in shown[0][1]
    assert shown[-1][1].endswith("0.90 s · 12 prompt / 9 reply tokens")


def test_cancelled_reply_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    use_api(monkeypatch, {
        "/jobs/7/stream": sse(("token", {"text": "Hel"}), ("done", {"id": 7, "status": "cancelled"})),
        "/chats/1": {"id": 1, "messages": [USER, message("cancelled", error="generation cancelled")]},
    })
    *_, (_, bot, meta) = chat.follow_replies({"id": 1, "messages": [USER, message("pending")]})
    assert bot[-1]["content"] == "⏹️ _Generation cancelled._"
    assert meta.endswith("cancelled")


def test_nothing_to_follow_leaves_the_page_as_it_is() -> None:
    done = {"id": 1, "messages": [USER, message("done", "Hello")]}
    for opened in (None, done):
        updates = list(chat.follow_replies(opened))
        assert len(updates) == 1 and all(u == gr.skip() for u in updates[0])


def test_compare_side_streams_then_shows_the_final_text(monkeypatch: pytest.MonkeyPatch) -> None:
    done = {"id": 8, "status": "succeeded", "result": {"text": "Hello Acme", "model": "baseline",
                                                        "latency_ms": 1500, "completion_tokens": 3,
                                                        "finish_reason": "eos"}}
    use_api(monkeypatch, {"/jobs/8/stream": sse(("token", {"text": "Hello"}), ("done", done))})
    shown = list(compare.stream_side([5, 8], "b"))
    assert shown[0] == ("Hello", "⏳ job #8 · writing…")
    assert shown[-1] == ("Hello Acme", "`baseline` · 1.50 s · 3 tokens · finish: eos")


def test_compare_side_keeps_the_partial_text_of_a_cancelled_job(monkeypatch: pytest.MonkeyPatch) -> None:
    done = {"id": 5, "status": "cancelled", "error": "cancelled by the user", "result": None}
    use_api(monkeypatch, {"/jobs/5/stream": sse(("token", {"text": "Hel"}), ("done", done))})
    assert list(compare.stream_side([5, 8], "a"))[-1] == ("Hel", "⚠️ **cancelled:** cancelled by the user")
