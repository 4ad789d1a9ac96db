"""Chat exports, streamed page by page: OpenAI fine-tuning JSONL, CSV, the original "--- Turn N ---"
text layout, and Markdown. CSV cells that a spreadsheet would run as a formula are neutralised."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.services.access import Caller
from api.services.chats import visible
from csra.specs import DEFAULT_INSTRUCTION
from db.models import ChatMessage, ChatSession
from db.session import get_sessionmaker

MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv", "txt": "text/plain", "md": "text/markdown"}
PAGE = 200
EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the chats as a file (Content-Disposition: attachment)",
          "content": {f"{media}; charset=utf-8": {"schema": {"type": "string"}} for media in MEDIA.values()}},
}


def export_response(lines: Iterator[str], fmt: str, stem: str) -> StreamingResponse:
    return StreamingResponse(lines, media_type=f"{MEDIA[fmt]}; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{stem}.{fmt}"'})


def _chat_pages(caller: Caller, chat_id: int | None, since: datetime | None,
                model: str | None) -> Iterator[list[ChatSession]]:
    """Chats in pages of ``PAGE`` (keyset by id), each with its messages, in a session of its own."""
    last = 0
    with get_sessionmaker()() as s:
        while True:
            q = visible(select(ChatSession), caller).where(ChatSession.id > last)
            if chat_id is not None:
                q = q.where(ChatSession.id == chat_id)
            if since is not None:
                q = q.where(ChatSession.updated_at >= since)
            if model:
                q = q.where(ChatSession.messages.any(ChatMessage.model_name == model))
            page = s.scalars(q.options(selectinload(ChatSession.messages)).order_by(ChatSession.id)
                             .limit(PAGE)).all()
            if not page:
                return
            yield list(page)
            last = page[-1].id
            s.expunge_all()


def _turns(chat: ChatSession) -> list[tuple[ChatMessage, ChatMessage | None]]:
    pairs: list[tuple[ChatMessage, ChatMessage | None]] = []
    for m in chat.messages:
        if m.role == "user":
            pairs.append((m, None))
        elif pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], m)
    return pairs


def export_lines(fmt: str, caller: Caller, chat_id: int | None = None, since: datetime | None = None,
                  model: str | None = None) -> Iterator[str]:
    render = {"jsonl": _jsonl, "csv": _csv, "txt": _txt, "md": _md}[fmt]
    if fmt == "csv":
        yield _csv_row(["chat_id", "chat_title", "turn", "role", "content", "model", "tone", "temperature",
                        "top_p", "status", "latency_ms", "feedback", "corrected_reply", "created_at"])
    if fmt == "md":
        yield "# csra chat export\n\n"
    for page in _chat_pages(caller, chat_id, since, model):
        for chat in page:
            yield render(chat)


def _jsonl(chat: ChatSession) -> str:
    """OpenAI chat fine-tuning format; a corrected reply replaces the model's, failed turns are left out."""
    system = chat.settings.get("system") or DEFAULT_INSTRUCTION
    msgs = [{"role": "system", "content": system}]
    for user, reply in _turns(chat):
        if reply is None or reply.status != "done":
            continue
        if reply.feedback == "down" and not reply.corrected_reply:
            continue
        msgs += [{"role": "user", "content": user.content},
                 {"role": "assistant", "content": reply.corrected_reply or reply.content}]
    meta = {"chat_id": chat.id, "title": chat.title}
    return json.dumps({"messages": msgs, "metadata": meta}, ensure_ascii=False) + "\n"


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula gets a leading apostrophe (OWASP's advice)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


def _csv_row(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow([_cell(v) for v in values])
    return buf.getvalue()


def _csv(chat: ChatSession) -> str:
    out = []
    for i, (user, reply) in enumerate(_turns(chat), start=1):
        for m in (user, reply):
            if m is None:
                continue
            st = m.settings or {}
            out.append(_csv_row([chat.id, chat.title, i, m.role, m.content if m.status != "failed" else "",
                                 m.model_name or "", st.get("tone", ""), st.get("temperature", ""),
                                 st.get("top_p", ""), m.status if m.status != "failed" else f"failed: {m.error}",
                                 m.latency_ms or "", m.feedback or "", m.corrected_reply or "",
                                 m.created_at.isoformat()]))
    return "".join(out)


def _reply_text(reply: ChatMessage | None) -> str:
    if reply is None or reply.status == "pending":
        return "(no reply yet)"
    if reply.status in ("failed", "cancelled"):
        return f"(reply {reply.status}: {reply.error})"
    return reply.content


def _txt(chat: ChatSession) -> str:
    """The original design's layout: ``--- Turn N ---`` blocks."""
    parts = [f"=== Chat {chat.id}: {chat.title} ===\n"]
    for i, (user, reply) in enumerate(_turns(chat), start=1):
        parts.append(f"--- Turn {i} ---\nCustomer: {user.content}\nAgent: {_reply_text(reply)}\n\n")
    return "".join(parts)


def _md(chat: ChatSession) -> str:
    parts = [f"## Chat {chat.id}: {chat.title}\n\n"]
    for i, (user, reply) in enumerate(_turns(chat), start=1):
        model = f" _({reply.model_name})_" if reply is not None and reply.model_name else ""
        parts.append(f"**Turn {i} - Customer:** {user.content}\n\n**Agent{model}:** {_reply_text(reply)}\n\n")
    return "".join(parts)
