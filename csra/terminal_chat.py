"""``csra chat``: an interactive terminal chat with the assistant, or one reply for scripts (``--message``).

It is a normal chat (``POST /chats``, ``POST /chats/{id}/messages``), so ``GET /chats`` and the UI list it.
Replies are streamed token by token from ``GET /jobs/{id}/stream``, as the UI's Chat tab reads them; once
a reply is done the chat is read again, and the stored turn (placeholders filled from the company profile,
intent, similar approved answers) is what the notes under the reply describe.

Three layers, so the loop can be tested without a terminal: ``csra.chat_commands.parse_line`` turns a
typed line into an action (no I/O), :class:`TerminalChat` holds the chat and talks to the API, and
:func:`run_loop` reads lines and shows replies through a :class:`ChatIO` (the terminal, or a fake in tests).

Output: the replies go to stdout (``csra chat > replies.txt`` keeps just them); the prompt, notes and
errors go to stderr.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, get_args

import typer
from rich.console import Console

from csra.chat_commands import (
    HELP,
    Action,
    Export,
    Help,
    Hint,
    NewChat,
    Quit,
    Rate,
    Say,
    Similar,
    parse_line,
)
from csra.client import ApiError, Client
from csra.specs import REPLY_TOKENS, Backend, Tone

PROMPT = "you> "
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline
# the chat settings a new chat copies (the fields of the API's ChatSettings)
SETTING_KEYS = ("model_id", "tone", "temperature", "top_p", "max_new_tokens", "ask_details_only_if_relevant", "seed",
                "backend", "copy_bias")
START_HINT = "Start it with `make run` or `csra up` (CSRA_API_URL says where the CLI looks for it)."



# ---------------------------------------------------------------------------- the chat, over the API
def error_text(e: ApiError) -> str:
    """An API error as one line; an API that cannot be reached at all also says how to start it (not a
    stream cut short or a timeout: the API is up then)."""
    return f"{e.detail} {START_HINT}" if e.status == 0 and "cannot reach" in e.detail else e.detail


def follow_reply(
    client: Client, job_id: int, on_token: Callable[[str], None], on_reset: Callable[[], None]
) -> dict[str, Any]:
    """Stream a generation job's reply into ``on_token`` until it ends; the finished job."""
    events = client.stream_job(job_id)
    try:
        for event, data in events:
            if event == "token":
                on_token(data.get("text", ""))
            elif event == "reset":  # a retried attempt writes the reply again from its start
                on_reset()
            elif event == "done":
                return data
    finally:
        getattr(events, "close", lambda: None)()  # Ctrl-C in on_token: let go of the HTTP stream now
    raise ApiError(0, f"the stream of job {job_id} ended before the job did")


class TerminalChat:
    """One open chat: created here (from ``settings``) or continued (``chat_id``, with ``overrides``
    sent on every message). A chat this session created and left without a message is deleted."""

    def __init__(self, client: Client, settings: dict[str, Any], title: str = "New chat",
                 chat_id: int | None = None) -> None:
        self.client = client
        self.settings = settings
        self.title = title
        self.overrides: dict[str, Any] = settings if chat_id is not None else {}
        self.chat: dict[str, Any] = client.chat(chat_id) if chat_id is not None else self._create()
        self.created_empty = chat_id is None
        self.last_reply: dict[str, Any] | None = _last_reply(self.chat)
        self.pending_job: int | None = None

    @property
    def chat_id(self) -> int:
        return int(self.chat["id"])

    def _create(self) -> dict[str, Any]:
        return self.client.create_chat(self.title, self.settings)

    def describe(self) -> str:
        """The banner line: chat id, model and settings the next reply uses."""
        st = {**self.chat.get("settings", {}), **self.overrides}
        shown = {"model_id": "model {}", "tone": "tone {}", "temperature": "temperature {}", "top_p": "top-p {}",
                 "max_new_tokens": "max {} new tokens", "backend": "backend {}", "copy_bias": "copy bias {}"}
        bits = [f"chat #{self.chat_id}", *(fmt.format(st[k]) for k, fmt in shown.items() if st.get(k) is not None)]
        if st.get("ask_details_only_if_relevant") is not None:
            bits.append("privacy on" if st["ask_details_only_if_relevant"] else "privacy off")
        return " · ".join(bits)

    def new(self) -> dict[str, Any]:
        """A new chat with the settings of this one (and the options given)."""
        self.discard_if_empty()
        current = self.chat.get("settings") or {}
        self.settings = {**{k: current[k] for k in SETTING_KEYS if current.get(k) is not None}, **self.overrides}
        self.overrides = {}
        self.chat, self.created_empty, self.last_reply = self._create(), True, None
        return self.chat

    def send(self, text: str, on_token: Callable[[str], None] = lambda t: None,
             on_reset: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Post a message, stream its reply; the assistant turn as stored once it ended."""
        accepted = self.client.post_message(self.chat_id, {"content": text, **self.overrides})
        self.created_empty = False
        self.last_reply = accepted["assistant_message"]
        self.pending_job = int(accepted["job"]["id"])
        follow_reply(self.client, self.pending_job, on_token, on_reset)
        self.pending_job = None
        return self.refresh()

    def refresh(self) -> dict[str, Any]:
        """Read the chat again; the stored version of the last reply."""
        self.chat = self.client.chat(self.chat_id)
        want = (self.last_reply or {}).get("id")
        self.last_reply = next((m for m in self.chat["messages"] if m["id"] == want), _last_reply(self.chat))
        return self.last_reply or {}

    def stop(self) -> None:
        """Cancel the reply being written (one that already ended stays as it is)."""
        job_id, self.pending_job = self.pending_job, None
        if job_id is not None:
            try:
                self.client.cancel_job(job_id)
            except ApiError as e:
                if e.status != 409:  # 409: it finished meanwhile
                    raise

    def rate(self, rating: str, corrected: str | None) -> dict[str, Any] | None:
        """Feedback on the last reply (None: there is none yet)."""
        if self.last_reply is not None:
            self.last_reply = self.client.feedback(self.chat_id, self.last_reply["id"], rating, corrected)
        return self.last_reply

    def export(self, fmt: str, path: Path | None) -> Path:
        """The API's export of this chat, written to ``path`` (a file or a folder; default: the current one)."""
        name, content = self.client.export_chat(self.chat_id, fmt)
        target = (path or Path.cwd()) / name if path is None or path.is_dir() else path
        target.write_bytes(content)
        return target

    def discard_if_empty(self) -> None:
        """Delete the chat if this session created it and never wrote to it (no empty rows in the list)."""
        if self.created_empty:
            with contextlib.suppress(ApiError):
                self.client.delete_chat(self.chat_id)
            self.created_empty = False


def _last_reply(chat: dict[str, Any]) -> dict[str, Any] | None:
    replies = [m for m in chat.get("messages", []) if m["role"] == "assistant"]
    return replies[-1] if replies else None


# ---------------------------------------------------------------------------- what is shown
@dataclass(frozen=True)
class Line:
    """A line under a reply: ``kind`` is ``note`` (dim), ``text`` (plain) or ``warn``."""

    kind: str
    text: str


def reply_notes(reply: dict[str, Any], streamed: str) -> list[Line]:
    """What to say after a streamed reply: how it ended, the stored text where it differs, one meta line."""
    if reply.get("status") == "failed":
        return [Line("warn", f"generation failed: {reply.get('error') or 'unknown error'}")]
    if reply.get("status") == "cancelled":
        return [Line("note", "reply cancelled")]
    if reply.get("status") != "done":
        return [Line("note", f"the reply is still {reply.get('status')} (job {reply.get('job_id')})")]
    lines = []
    content = (reply.get("content") or "").strip()
    if not content:
        lines.append(Line("note", "(empty reply)"))
    elif content != streamed.strip():
        lines.append(Line("text", f"as stored, with the company profile filled in: {content}"))
    lines.append(Line("note", meta_line(reply)))
    if reply.get("follows_approved") is False:
        lines.append(Line("warn", "no approved answer is close to this message: the model's own words, not held "
                                  "to an approved answer"))
    if reply.get("slot_warnings"):
        lines.append(Line("warn", "placeholders outside the contract: " + ", ".join(reply["slot_warnings"])))
    return lines


def meta_line(reply: dict[str, Any]) -> str:
    """Model, latency, tokens, predicted intent and how many similar approved answers there are."""
    bits = [str(reply.get("model_name") or "?")]
    if reply.get("latency_ms") is not None:
        bits.append(f"{reply['latency_ms'] / 1000:.2f} s")
    if reply.get("completion_tokens") is not None:
        bits.append(f"{reply['completion_tokens']} tokens")
    if reply.get("intent"):
        bits.append(f"intent {reply['intent']} ({(reply.get('intent_confidence') or 0):.0%})")
    if reply.get("similar"):
        bits.append(f"{len(reply['similar'])} similar approved answers (/similar)")
    return " · ".join(bits)


def similar_lines(reply: dict[str, Any] | None) -> list[Line]:
    similar = (reply or {}).get("similar") or []
    if not similar:
        return [Line("note", "no similar approved answers for the last message (is the answer memory built?)")]
    return [Line("text", f"{s.get('similarity', 0):.2f} [{s.get('intent') or '?'}] "
                         f"{'(the reply stands on it) ' if s.get('grounded') else ''}{s.get('reply', '')}")
            for s in similar]


def feedback_note(reply: dict[str, Any]) -> str:
    if reply.get("corrected_reply"):
        return f"thumbs {reply['feedback']} saved, with your corrected reply (now in the answer memory)"
    if reply.get("feedback") == "up":
        return "thumbs up saved: the reply is now an approved answer in the answer memory"
    return "thumbs down saved"


# ---------------------------------------------------------------------------- the loop
class ChatIO(Protocol):
    def read(self, prompt: str) -> str | None:
        """The next typed line; None at the end of input (Ctrl-D)."""

    def token(self, text: str) -> None:
        """A piece of the reply being written."""

    def end_reply(self) -> None:
        """The reply being written has ended."""

    def show(self, line: Line) -> None:
        """A note, text or warning outside the reply."""


class StreamedReply:
    """The text of the reply being streamed, shown as it comes, blank-stripped as the API stores it:
    leading blanks are dropped and trailing ones held back until more text follows."""

    def __init__(self, io: ChatIO) -> None:
        self.io, self.text, self.held, self.shown = io, "", "", False

    def add(self, piece: str) -> None:
        self.text += piece
        visible = self.held + piece if self.shown else piece.lstrip()
        body = visible.rstrip()
        self.held = visible[len(body):]
        if body:
            self.io.token(body)
            self.shown = True

    def reset(self) -> None:
        self.end()
        self.io.show(Line("note", "the worker retried; the reply starts over"))
        self.text = ""

    def end(self) -> None:
        if self.shown:
            self.io.end_reply()
        self.held, self.shown = "", False


def run_loop(session: TerminalChat, io: ChatIO) -> None:
    """Read lines until /quit, Ctrl-D or Ctrl-C at the prompt; an API error is one line and the loop goes on."""
    io.show(Line("note", f"{session.describe()} · /help for commands, /quit or Ctrl-D to leave"))
    while True:
        try:
            line = io.read(PROMPT)
        except KeyboardInterrupt:
            line = None
        if line is None:
            return
        action = parse_line(line)
        if isinstance(action, Quit):
            return
        try:
            handle(session, io, action)
        except ApiError as e:
            io.show(Line("warn", f"error: {error_text(e)}"))


def handle(session: TerminalChat, io: ChatIO, action: Action) -> None:
    """Do what one line asked for."""
    if isinstance(action, Say):
        say(session, io, action.text)
    elif isinstance(action, Export):
        try:
            io.show(Line("note", f"exported chat #{session.chat_id} to {session.export(action.fmt, action.path)}"))
        except OSError as e:
            io.show(Line("warn", f"cannot write the export: {e}"))
    elif isinstance(action, Rate):
        rated = session.rate(action.rating, action.corrected)
        io.show(Line("note", feedback_note(rated)) if rated else Line("warn", "no reply to rate yet"))
    elif isinstance(action, NewChat):
        session.new()
        io.show(Line("note", f"new {session.describe()}"))
    elif isinstance(action, Similar):
        for line in similar_lines(session.last_reply):
            io.show(line)
    elif isinstance(action, Help):
        io.show(Line("text", HELP))
    elif isinstance(action, Hint):
        io.show(Line("warn", action.text))


def say(session: TerminalChat, io: ChatIO, text: str) -> None:
    """Send a message and stream its reply; Ctrl-C while it is written cancels it."""
    streamed = StreamedReply(io)
    try:
        reply = session.send(text, streamed.add, streamed.reset)
    except KeyboardInterrupt:
        streamed.end()
        session.stop()
        io.show(Line("note", "stopped: the reply was cancelled"))
        return
    finally:
        streamed.end()
    for line in reply_notes(reply, streamed.text):
        io.show(line)


class ReplyFailed(Exception):
    """A reply that ended without text: its generation failed or was cancelled."""


def one_reply(session: TerminalChat, message: str) -> str:
    """The stored reply to one message (``--message``); :class:`ReplyFailed` if there is none."""
    reply = session.send(message)
    if reply.get("status") != "done":
        raise ReplyFailed(f"generation {reply.get('status')}: {reply.get('error') or 'no reply'}")
    return str(reply.get("content") or "")


# ---------------------------------------------------------------------------- the terminal
class TerminalIO:
    """Replies to stdout as they are written; prompt, notes and errors to stderr."""

    STYLES = {"note": "dim", "text": "", "warn": "yellow"}

    def __init__(self) -> None:
        self.err = Console(stderr=True, highlight=False)
        self.interactive, self.tty_out = sys.stdin.isatty(), sys.stdout.isatty()
        if self.interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())

    def read(self, prompt: str) -> str | None:
        try:
            if self.interactive and self.tty_out:
                return input(prompt)
            if self.interactive:
                self.err.print(prompt, end="", markup=False)
            line = sys.stdin.readline()
            return line if line else None
        except (EOFError, KeyboardInterrupt):
            if self.interactive:  # the shell's prompt on a line of its own
                self.err.print()
            return None

    def token(self, text: str) -> None:
        if self.tty_out:  # a model's control characters (escape sequences) never drive the terminal
            text = CONTROL.sub("", text)
        sys.stdout.write(text)
        sys.stdout.flush()

    def end_reply(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()

    def show(self, line: Line) -> None:
        self.err.print(CONTROL.sub("", line.text), style=self.STYLES.get(line.kind, ""), markup=False, soft_wrap=True)


def _settings(model: str | None, tone: str | None, temperature: float | None, top_p: float | None,
              privacy: bool | None, max_new_tokens: int | None, backend: str | None = None,
              copy_bias: float | None = None) -> dict[str, Any]:
    """The chat settings the options give (unset ones are left to the chat or the API's defaults)."""
    given = {"model_id": model, "tone": tone, "temperature": temperature, "top_p": top_p,
             "ask_details_only_if_relevant": privacy, "max_new_tokens": max_new_tokens, "backend": backend,
             "copy_bias": copy_bias}
    return {k: v for k, v in given.items() if v is not None}


def _fail(err: Console, message: str, code: int = 1) -> typer.Exit:
    err.print(f"error: {message}", style="red", markup=False, soft_wrap=True)
    return typer.Exit(code=code)


def chat(
    model: Annotated[str | None, typer.Option(
        help="model name or id (csra models); default the API's, baseline; 'retrieval' answers from memory")] = None,
    tone: Annotated[Tone | None, typer.Option(help="tone of the replies (default neutral)")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default), up to 2")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="nucleus sampling, (0, 1]")] = None,
    privacy: Annotated[bool | None, typer.Option(
        "--privacy/--no-privacy", help="ask for order/account details only if needed (default) / never")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help=f"longest reply (default {REPLY_TOKENS} tokens)")] = None,
    backend: Annotated[str | None, typer.Option(
        help=f"{', '.join(get_args(Backend))} (default auto: llama.cpp where the model has a GGUF export)")] = None,
    copy_bias: Annotated[float | None, typer.Option(
        help="grounded models: how closely replies follow approved answers, 0-20 (default: the model's own)")] = None,
    title: Annotated[str | None, typer.Option(help="chat title (default: the first message)")] = None,
    chat_id: Annotated[int | None, typer.Option("--chat", help="continue this chat (the options override it)")] = None,
    message: Annotated[str | None, typer.Option(
        "--message", "-m", help="send this one message, print the reply and exit (for scripts)")] = None,
) -> None:
    """Chat with the assistant in the terminal, replies streamed; a normal chat the UI lists too."""
    err = Console(stderr=True, highlight=False)
    settings = _settings(model, tone, temperature, top_p, privacy, max_new_tokens, backend, copy_bias)
    try:
        with Client() as client:
            session = TerminalChat(client, settings, title or "New chat", chat_id)
            try:
                if message is not None:
                    reply = one_reply(session, message)
                    sys.stdout.write((CONTROL.sub("", reply) if sys.stdout.isatty() else reply) + "\n")
                else:
                    run_loop(session, TerminalIO())
            except KeyboardInterrupt:
                session.stop()
                raise typer.Exit(code=130) from None
            finally:
                session.discard_if_empty()
    except ApiError as e:
        raise _fail(err, error_text(e)) from None
    except ReplyFailed as e:
        raise _fail(err, str(e)) from None
