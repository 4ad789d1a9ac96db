"""csra.terminal_chat (``csra chat``): parsing typed lines, what is shown after a reply, the command loop
with a fake terminal, and the stopped-API message of the real command.

The loop's API is an ``httpx.MockTransport`` that keeps chats in a dict (a stub of the transport only:
the client and the loop run unchanged); tests/integration/test_chat_cli.py runs the command against the
real stack.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from csra.chat_commands import Blank, Export, Help, Hint, NewChat, Quit, Rate, Say, Similar, parse_line
from csra.client import ApiError, Client
from csra.terminal_chat import PROMPT, Line, StreamedReply, TerminalChat, error_text, reply_notes, run_loop

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- typed lines
@pytest.mark.parametrize(
    ("line", "action"),
    [
        ("Where is my order?\n", Say("Where is my order?")),
        ("   ", Blank()),
        ("//etc/hosts is broken", Say("/etc/hosts is broken")),
        ("/export md", Export("md")),
        ("/export JSONL out/chat.jsonl", Export("jsonl", Path("out/chat.jsonl"))),
        ("/export", Hint("usage: /export jsonl|csv|txt|md [PATH]")),
        ("/export pdf x.pdf", Hint("usage: /export jsonl|csv|txt|md [PATH]")),
        ("/feedback up", Rate("up")),
        ("/feedback down  Your order ships today. ", Rate("down", "Your order ships today.")),
        ("/feedback sideways", Hint("usage: /feedback up|down [corrected reply]")),
        ("/new", NewChat()),
        ("/new chat please", Hint("/new takes no arguments")),
        ("/similar", Similar()),
        ("/help", Help()),
        ("/QUIT", Quit()),
        ("/exit", Quit()),
        ("/frobnicate", Hint("unknown command /frobnicate; /help lists the commands")),
    ],
)
def test_parse_line(line: str, action: object) -> None:
    assert parse_line(line) == action


# ---------------------------------------------------------------------------- what is shown
DONE = {"id": 2, "role": "assistant", "status": "done", "content": "Your order #42 ships today.",
        "raw_content": "Your order {{Order Number}} ships today.", "model_name": "baseline", "latency_ms": 420.0,
        "completion_tokens": 9, "intent": "track_order", "intent_confidence": 0.8,
        "similar": [{"reply": "It ships today.", "intent": "track_order", "similarity": 0.91}]}


def test_filled_placeholders_are_shown_once_and_the_meta_line_is_one_line() -> None:
    lines = reply_notes(DONE, " Your order {{Order Number}} ships today.")
    assert lines == [
        Line("text", "as stored, with the company profile filled in: Your order #42 ships today."),
        Line("note", "baseline · 0.42 s · 9 tokens · intent track_order (80%) · 1 similar approved answers (/similar)"),
    ]
    same = {**DONE, "content": "Hello.", "raw_content": "Hello.", "similar": None, "intent": None}
    assert reply_notes(same, "Hello.") == [Line("note", "baseline · 0.42 s · 9 tokens")]


def test_failed_cancelled_and_slot_warnings() -> None:
    assert reply_notes({"status": "failed", "error": "worker lost"}, "") == [
        Line("warn", "generation failed: worker lost")]
    assert reply_notes({"status": "cancelled"}, "Hel") == [Line("note", "reply cancelled")]
    warned = reply_notes({**DONE, "slot_warnings": ["{{Refund Amount}}"]}, DONE["raw_content"])
    assert warned[-1] == Line("warn", "placeholders outside the contract: {{Refund Amount}}")
    own = reply_notes({**DONE, "follows_approved": False}, DONE["raw_content"])
    assert own[-1].kind == "warn" and "no approved answer is close" in own[-1].text
    for held in (True, None):  # held to an approved answer, or not grounded at all: nothing to say
        assert reply_notes({**DONE, "follows_approved": held}, DONE["raw_content"])[-1].kind == "note"


def test_unreachable_api_error_says_how_to_start_it() -> None:
    assert "`make run` or `csra up`" in error_text(ApiError(0, "cannot reach the csra API at http://x"))
    assert error_text(ApiError(422, "unknown model 'nope'")) == "unknown model 'nope'"


# ---------------------------------------------------------------------------- the loop, with fakes
class FakeIO:
    """A terminal: typed lines in, what the loop writes out (``stdout``: the replies; ``shown``: the rest)."""

    def __init__(self, *lines: str, interrupt_on_token: bool = False) -> None:
        self.lines = list(lines)
        self.stdout = ""
        self.shown: list[Line] = []
        self.interrupt_on_token = interrupt_on_token

    def read(self, prompt: str) -> str | None:
        assert prompt == PROMPT
        if not self.lines:
            return None
        line = self.lines.pop(0)
        if line == "^C":
            raise KeyboardInterrupt
        return line

    def token(self, text: str) -> None:
        if self.interrupt_on_token:
            self.interrupt_on_token = False
            raise KeyboardInterrupt
        self.stdout += text

    def end_reply(self) -> None:
        self.stdout += "\n"

    def show(self, line: Line) -> None:
        self.shown.append(line)

    def text(self) -> str:
        return "\n".join(line.text for line in self.shown)


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {e}\r\ndata: {json.dumps(d)}\r\n\r\n" for e, d in events).encode()


class FakeApi:
    """The chat routes the terminal chat calls, over chats kept in a dict; every reply is ``TOKENS``."""

    TOKENS = (" Your order", " {{Order Number}}", " ships today.")

    def __init__(self) -> None:
        self.chats: dict[int, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.ids = iter(range(1, 1000))

    def __call__(self, r: httpx.Request) -> httpx.Response:
        self.calls.append(f"{r.method} {r.url.path}")
        body = json.loads(r.content) if r.content else {}
        for pattern, route in self.routes():
            m = re.fullmatch(pattern, f"{r.method} {r.url.path}")
            if m:
                return route(body, *(int(g) for g in m.groups()))
        return httpx.Response(404, json={"detail": f"no route {r.method} {r.url.path}"})

    def routes(self) -> list[tuple[str, Any]]:
        return [
            (r"POST /chats", self.create), (r"GET /chats/(\d+)", self.read), (r"DELETE /chats/(\d+)", self.delete),
            (r"POST /chats/(\d+)/messages", self.post), (r"GET /jobs/(\d+)/stream", self.stream),
            (r"POST /jobs/(\d+)/cancel", self.cancel), (r"POST /chats/(\d+)/messages/(\d+)/feedback", self.rate),
            (r"GET /chats/(\d+)/export", self.export),
        ]

    def create(self, body: dict[str, Any]) -> httpx.Response:
        if body["settings"].get("model_id") == "nope":
            return httpx.Response(422, json={"detail": "unknown model 'nope': GET /models lists the models"})
        chat = {"id": next(self.ids), "title": body["title"], "settings": body["settings"], "messages": []}
        self.chats[chat["id"]] = chat
        return httpx.Response(201, json=chat)

    def read(self, body: dict[str, Any], chat_id: int) -> httpx.Response:
        return httpx.Response(200, json=self.chats[chat_id])

    def delete(self, body: dict[str, Any], chat_id: int) -> httpx.Response:
        del self.chats[chat_id]
        return httpx.Response(204)

    def post(self, body: dict[str, Any], chat_id: int) -> httpx.Response:
        if chat_id not in self.chats:
            return httpx.Response(404, json={"detail": f"chat {chat_id} not found"})
        user = {"id": next(self.ids), "role": "user", "content": body["content"], "status": "done"}
        job_id = next(self.ids)
        reply = {"id": job_id, "role": "assistant", "content": "", "status": "pending", "job_id": job_id,
                 "model_name": "baseline", "settings": body}
        self.chats[chat_id]["messages"] += [user, reply]
        return httpx.Response(202, json={"user_message": user, "assistant_message": reply, "job": {"id": job_id}})

    def _reply(self, job_id: int) -> dict[str, Any]:
        return next(m for c in self.chats.values() for m in c["messages"] if m.get("job_id") == job_id)

    def stream(self, body: dict[str, Any], job_id: int) -> httpx.Response:
        raw = "".join(self.TOKENS).strip()
        self._reply(job_id).update(status="done", raw_content=raw, content=raw.replace("{{Order Number}}", "#42"))
        events = [("token", {"text": t}) for t in self.TOKENS] + [("done", {"id": job_id, "status": "succeeded"})]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse(*events))

    def cancel(self, body: dict[str, Any], job_id: int) -> httpx.Response:
        self._reply(job_id).update(status="cancelled", content="")
        return httpx.Response(200, json={"id": job_id, "status": "cancelled"})

    def rate(self, body: dict[str, Any], chat_id: int, message_id: int) -> httpx.Response:
        msg = next(m for m in self.chats[chat_id]["messages"] if m["id"] == message_id)
        msg.update(feedback=body["rating"], corrected_reply=body.get("corrected_reply"))
        return httpx.Response(200, json=msg)

    def export(self, body: dict[str, Any], chat_id: int) -> httpx.Response:
        text = "".join(f"**{m['role']}**: {m['content']}\n" for m in self.chats[chat_id]["messages"])
        return httpx.Response(200, content=text.encode(),
                              headers={"content-disposition": f'attachment; filename="chat-{chat_id}.md"'})


@pytest.fixture()
def fake() -> FakeApi:
    return FakeApi()


def session_for(fake: FakeApi, settings: dict[str, Any] | None = None, chat_id: int | None = None) -> TerminalChat:
    client = Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(fake))
    return TerminalChat(client, settings or {}, "New chat", chat_id)


def test_a_session_streams_rates_exports_and_starts_a_new_chat(
    fake: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    session = session_for(fake, {"tone": "friendly", "max_new_tokens": 8})
    io = FakeIO("Where is my order?", "/feedback down It ships today.", "/export md", "/export pdf",
                "/bogus", "/new", "hello again", "/quit", "never read")
    run_loop(session, io)

    # the reply streamed as written (leading blank dropped), the filled-in version said once after it
    assert io.stdout == "Your order {{Order Number}} ships today.\nYour order {{Order Number}} ships today.\n"
    assert "as stored, with the company profile filled in: Your order #42 ships today." in io.text()
    assert "thumbs down saved, with your corrected reply" in io.text()
    assert (tmp_path / "chat-1.md").read_text().startswith("**user**: Where is my order?")
    assert Line("warn", "usage: /export jsonl|csv|txt|md [PATH]") in io.shown
    assert Line("warn", "unknown command /bogus; /help lists the commands") in io.shown
    assert io.lines == ["never read"]  # /quit ended the loop
    first, second = fake.chats.values()
    assert first["messages"][1]["corrected_reply"] == "It ships today."
    assert second["settings"]["tone"] == "friendly" and second["messages"][0]["content"] == "hello again"


def test_ctrl_c_while_a_reply_streams_cancels_it_and_the_session_goes_on(fake: FakeApi) -> None:
    session = session_for(fake)
    io = FakeIO("first", "second", interrupt_on_token=True)
    run_loop(session, io)
    assert Line("note", "stopped: the reply was cancelled") in io.shown
    assert "POST /jobs/3/cancel" in fake.calls
    assert io.stdout == "Your order {{Order Number}} ships today.\n"  # the second message was answered


@pytest.mark.parametrize("last", ["^C", None])
def test_ctrl_c_or_ctrl_d_at_the_prompt_leaves_and_an_unused_chat_is_not_kept(fake: FakeApi, last: str | None) -> None:
    session = session_for(fake)
    run_loop(session, FakeIO(*([last] if last else [])))
    session.discard_if_empty()
    assert fake.chats == {}
    used = session_for(fake)
    run_loop(used, FakeIO("hi"))
    used.discard_if_empty()
    assert list(fake.chats) == [used.chat_id]


def test_continuing_a_chat_sends_the_options_with_each_message_and_never_deletes_it(fake: FakeApi) -> None:
    chat_id = session_for(fake, {"model_id": "baseline"}).chat_id
    session = session_for(fake, {"temperature": 0.7}, chat_id=chat_id)
    run_loop(session, FakeIO("hi"))
    session.discard_if_empty()
    assert fake.chats[chat_id]["messages"][1]["settings"] == {"content": "hi", "temperature": 0.7}


def test_bad_commands_inside_the_loop_are_one_line(fake: FakeApi) -> None:
    session = session_for(fake)
    io = FakeIO("/feedback up", "/export md /no/such/folder/x.md")
    run_loop(session, io)
    assert io.shown[1] == Line("warn", "no reply to rate yet")
    assert io.shown[2].kind == "warn" and io.shown[2].text.startswith("cannot write the export:")


def test_an_api_error_is_one_line_and_the_session_goes_on(fake: FakeApi) -> None:
    session = session_for(fake)
    fake.chats.clear()  # deleted from the UI meanwhile
    io = FakeIO("hi", "/help")
    run_loop(session, io)
    assert io.shown[1] == Line("warn", "error: chat 1 not found")
    assert io.shown[2].text.startswith("Type a customer message")


def test_an_unknown_model_is_the_apis_detail(fake: FakeApi) -> None:
    with pytest.raises(ApiError, match="unknown model 'nope'"):
        session_for(fake, {"model_id": "nope"})


def test_streamed_reply_restarts_on_reset() -> None:
    io = FakeIO()
    streamed = StreamedReply(io)
    for piece in ("  Hel", "lo"):
        streamed.add(piece)
    streamed.reset()
    streamed.add(" Hi")
    streamed.end()
    assert io.stdout == "Hello\nHi\n" and streamed.text == " Hi"
    assert io.shown == [Line("note", "the worker retried; the reply starts over")]


def test_streamed_reply_is_shown_blank_stripped_as_it_is_stored() -> None:
    io = FakeIO()
    streamed = StreamedReply(io)
    for piece in (" \n", "Hi ", "\n", "\n", "there", " ", "\n"):
        streamed.add(piece)
    streamed.end()
    assert io.stdout == "Hi \n\nthere\n"  # trailing blanks held back, never shown as nothing followed
    assert streamed.text.strip() + "\n" == io.stdout


# ---------------------------------------------------------------------------- the command, API stopped
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [["--message", "hi"], []])
def test_stopped_api_says_how_to_start_it_without_a_traceback(tmp_path: Path, args: list[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    env.update(CSRA_API_URL=url, CSRA_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "csra.cli", "chat", *args], env=env, cwd=tmp_path,
                          input="hello\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot reach the csra API at {url}" in proc.stderr
    assert "Start it with `make run` or `csra up`" in proc.stderr
    assert proc.stdout == ""
