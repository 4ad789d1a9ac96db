"""Chats: sessions with stored turns, replies as generation jobs, feedback, streamed exports."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from api.deps import DbSession, Owner
from api.routes.generation import check_message, resolve_model_ref, submit_generation
from api.routes.models import find_model
from api.schemas import JobPublic
from csra.specs import DEFAULT_INSTRUCTION, GenerateSpec, GenerationSettings
from db.base import utcnow
from db.models import TERMINAL, ChatMessage, ChatSession, Job
from db.session import get_sessionmaker

router = APIRouter(prefix="/chats", tags=["chats"])

ExportFormat = Literal["jsonl", "csv", "txt", "md"]
MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv", "txt": "text/plain", "md": "text/markdown"}
PAGE = 200


class ChatSettings(GenerationSettings):
    model_id: str = "baseline"


class ChatCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field("New chat", min_length=1, max_length=200)
    settings: ChatSettings = Field(default_factory=ChatSettings)


class ChatUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(None, min_length=1, max_length=200)
    settings: ChatSettings | None = None


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str
    model_id: str | None = None
    tone: Literal["neutral", "friendly", "strict_professional"] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, le=2048)
    ask_details_only_if_relevant: bool | None = None
    seed: int | None = None


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Literal["up", "down"]
    corrected_reply: str | None = Field(None, max_length=20_000)


class MessagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    chat_id: int
    role: str
    content: str
    raw_content: str | None = None
    model_name: str | None = None
    settings: dict[str, Any] | None = None
    status: str
    error: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    feedback: str | None = None
    corrected_reply: str | None = None
    job_id: int | None = None
    created_at: datetime


class ChatPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    title: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    messages: list[MessagePublic] = Field(default_factory=list)


class ChatsPublic(BaseModel):
    data: list[ChatPublic]
    count: int


class MessageAccepted(BaseModel):
    user_message: MessagePublic
    assistant_message: MessagePublic
    job: JobPublic


def _visible(q: Any, owner: str | None) -> Any:
    return q.where(ChatSession.owner == owner) if owner is not None else q


def get_chat_or_404(db: Session, chat_id: int, owner: str | None) -> ChatSession:
    chat = db.scalar(_visible(select(ChatSession).where(ChatSession.id == chat_id), owner))
    if chat is None:
        raise HTTPException(status_code=404, detail=f"chat {chat_id} not found")
    return chat


def _settle_pending(db: Session, chat: ChatSession) -> None:
    """A pending reply whose job ended without filling it in (cancelled while queued, lost) shows as failed."""
    changed = False
    for m in chat.messages:
        if m.status == "pending" and m.job_id is not None:
            job = db.get(Job, m.job_id)
            if job is not None and job.status in TERMINAL and job.status != "succeeded":
                cancelled = job.status == "cancelled"
                m.status = "cancelled" if cancelled else "failed"
                m.error = job.error or ("generation cancelled" if cancelled else f"generation {job.status}")
                changed = True
    if changed:
        db.commit()


@router.post("", status_code=201, response_model=ChatPublic)
def create_chat(body: ChatCreate, db: DbSession, owner: Owner) -> ChatSession:
    settings = body.settings.model_dump()
    settings["model_id"] = resolve_model_ref(db, body.settings.model_id)
    chat = ChatSession(title=body.title, settings=settings, owner=owner)
    db.add(chat)
    db.commit()
    db.refresh(chat)
    return chat


@router.patch("/{chat_id}", response_model=ChatPublic)
def update_chat(chat_id: int, body: ChatUpdate, db: DbSession, owner: Owner) -> ChatSession:
    """Rename a chat or replace its default model and settings (later turns use them)."""
    chat = get_chat_or_404(db, chat_id, owner)
    if body.title is not None:
        chat.title = body.title
    if body.settings is not None:
        settings = body.settings.model_dump()
        settings["model_id"] = resolve_model_ref(db, body.settings.model_id)
        chat.settings = settings
    chat.updated_at = utcnow()
    db.commit()
    db.refresh(chat)
    return chat


@router.get("", response_model=ChatsPublic)
def list_chats(db: DbSession, owner: Owner, limit: int = Query(50, ge=1, le=500),
               offset: int = Query(0, ge=0)) -> ChatsPublic:
    q = _visible(select(ChatSession), owner)
    rows = db.scalars(q.order_by(ChatSession.updated_at.desc()).limit(limit).offset(offset)).all()
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    return ChatsPublic(data=[ChatPublic(id=c.id, title=c.title, settings=c.settings, created_at=c.created_at,
                                        updated_at=c.updated_at) for c in rows], count=count)


@router.get("/export")
def export_chats(
    db: DbSession, owner: Owner, format: ExportFormat = "jsonl", since: datetime | None = None,
    model: str | None = Query(None, description="only chats with a reply from this model"),
) -> StreamingResponse:
    """Every visible chat, streamed page by page (10,000 chats never sit in memory at once)."""
    return _export_response(_export_lines(format, owner, since=since, model=model), format, "chats")


@router.get("/{chat_id}", response_model=ChatPublic)
def read_chat(chat_id: int, db: DbSession, owner: Owner) -> ChatSession:
    chat = get_chat_or_404(db, chat_id, owner)
    _settle_pending(db, chat)
    return chat


@router.delete("/{chat_id}", status_code=204)
def delete_chat(chat_id: int, db: DbSession, owner: Owner) -> Response:
    db.delete(get_chat_or_404(db, chat_id, owner))
    db.commit()
    return Response(status_code=204)


def _history(chat: ChatSession) -> list[dict[str, str]]:
    """The turns the model sees: finished user/assistant pairs (its own raw words, not filled slots)."""
    turns: list[dict[str, str]] = []
    for m in chat.messages:
        if m.role == "user":
            turns.append({"role": "user", "content": m.content})
        elif m.status == "done" and (m.raw_content or m.content).strip():
            turns.append({"role": "assistant", "content": m.raw_content or m.content})
        elif turns and turns[-1]["role"] == "user":
            turns.pop()  # a failed (or empty) reply: drop the unanswered question from the history
    return turns


@router.post("/{chat_id}/messages", status_code=202, response_model=MessageAccepted)
def post_message(chat_id: int, body: MessageCreate, db: DbSession, owner: Owner) -> MessageAccepted:
    """Store the user's turn, enqueue the reply; the assistant turn is filled in when the job ends."""
    chat = get_chat_or_404(db, chat_id, owner)
    check_message(body.content)
    overrides = body.model_dump(exclude_none=True, exclude={"content"})
    settings = {**chat.settings, **overrides}
    model_ref = settings.get("model_id", "baseline")
    if "model_id" in overrides:
        settings["model_id"] = resolve_model_ref(db, model_ref)
    else:
        model = find_model(db, model_ref)
        if model is None:
            raise HTTPException(status_code=422, detail=(
                f"this chat's model {model_ref!r} no longer exists (deleted?); send model_id to pick another "
                "(GET /models lists them), or PATCH the chat's settings"))
        settings["model_id"] = model.name
    spec = GenerateSpec.model_validate({**settings, "messages": [*_history(chat), {"role": "user",
                                                                                   "content": body.content}]})
    user = ChatMessage(chat_id=chat.id, role="user", content=body.content, status="done")
    assistant = ChatMessage(chat_id=chat.id, role="assistant", content="", status="pending",
                            model_name=settings["model_id"], settings=settings)
    db.add_all([user, assistant])
    db.flush()
    user_id, assistant_id = user.id, assistant.id

    def forget_turn(s: Session) -> None:  # the queue refused the job: the turn was never asked
        for mid in (user_id, assistant_id):
            row = s.get(ChatMessage, mid)
            if row is not None:
                s.delete(row)

    job = submit_generation(db, spec, owner, on_rollback=forget_turn, chat_id=chat.id,
                            assistant_message_id=assistant_id)
    assistant = db.get(ChatMessage, assistant_id)  # type: ignore[assignment]
    assistant.job_id = job.id
    chat.updated_at = utcnow()
    if chat.title == "New chat":
        chat.title = body.content.strip()[:60]
    db.commit()
    return MessageAccepted(user_message=MessagePublic.model_validate(db.get(ChatMessage, user_id)),
                           assistant_message=MessagePublic.model_validate(assistant),
                           job=JobPublic.model_validate(job))


@router.post("/{chat_id}/messages/{message_id}/feedback", response_model=MessagePublic)
def message_feedback(chat_id: int, message_id: int, body: Feedback, db: DbSession, owner: Owner) -> ChatMessage:
    """Thumbs up/down and an optional corrected reply: raw material for later training."""
    get_chat_or_404(db, chat_id, owner)
    msg = db.get(ChatMessage, message_id)
    if msg is None or msg.chat_id != chat_id:
        raise HTTPException(status_code=404, detail=f"message {message_id} not found in chat {chat_id}")
    if msg.role != "assistant":
        raise HTTPException(status_code=422, detail="feedback is for assistant replies, not user messages")
    msg.feedback = body.rating
    if body.corrected_reply is not None:
        msg.corrected_reply = body.corrected_reply.strip() or None
    db.commit()
    db.refresh(msg)
    return msg


@router.get("/{chat_id}/export")
def export_chat(chat_id: int, db: DbSession, owner: Owner, format: ExportFormat = "jsonl") -> StreamingResponse:
    get_chat_or_404(db, chat_id, owner)
    return _export_response(_export_lines(format, owner, chat_id=chat_id), format, f"chat-{chat_id}")


# ----------------------------------------------------------------------------- export


def _export_response(lines: Iterator[str], fmt: str, stem: str) -> StreamingResponse:
    return StreamingResponse(lines, media_type=f"{MEDIA[fmt]}; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{stem}.{fmt}"'})


def _chat_pages(owner: str | None, chat_id: int | None, since: datetime | None,
                model: str | None) -> Iterator[list[ChatSession]]:
    """Chats in pages of ``PAGE`` (keyset by id), each with its messages, in a session of its own."""
    last = 0
    with get_sessionmaker()() as s:
        while True:
            q = _visible(select(ChatSession), owner).where(ChatSession.id > last)
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


def _export_lines(fmt: str, owner: str | None, chat_id: int | None = None, since: datetime | None = None,
                  model: str | None = None) -> Iterator[str]:
    render = {"jsonl": _jsonl, "csv": _csv, "txt": _txt, "md": _md}[fmt]
    if fmt == "csv":
        yield _csv_row(["chat_id", "chat_title", "turn", "role", "content", "model", "tone", "temperature",
                        "top_p", "status", "latency_ms", "feedback", "corrected_reply", "created_at"])
    if fmt == "md":
        yield "# csra chat export\n\n"
    for page in _chat_pages(owner, chat_id, since, model):
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


def _csv_row(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
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
