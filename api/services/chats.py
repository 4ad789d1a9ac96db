"""Chats: create, update, read, and post a message (the user turn, the pending assistant turn and the
generation job answering it are written in one transaction, then the job is enqueued)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas.chats import ChatCreate, ChatUpdate, Feedback, MessageAccepted, MessageCreate, MessagePublic
from api.schemas.jobs import JobPublic
from api.services import jobs, memory
from api.services.access import Caller, owned
from api.services.generation import check_message, job_params
from api.services.models import resolve_model_name
from csra.specs import GenerateRequest, ReplyTo
from db.base import utcnow
from db.jobs import JobKind
from db.models import ChatMessage, ChatSession
from models_store.registry import find_model


def visible(q: Any, caller: Caller) -> Any:
    return owned(q, ChatSession.owner, caller)


def get_chat_or_404(db: Session, chat_id: int, caller: Caller) -> ChatSession:
    chat = db.scalar(visible(select(ChatSession).where(ChatSession.id == chat_id), caller))
    if chat is None:
        raise HTTPException(status_code=404, detail=f"chat {chat_id} not found")
    return chat


def create_chat(db: Session, body: ChatCreate, caller: Caller) -> ChatSession:
    settings = body.settings.model_dump()
    settings["model_id"] = resolve_model_name(db, body.settings.model_id)
    chat = ChatSession(title=body.title, settings=settings, owner=caller.name)
    db.add(chat)
    db.commit()
    db.refresh(chat)
    return chat


def update_chat(db: Session, chat_id: int, body: ChatUpdate, caller: Caller) -> ChatSession:
    """Rename a chat or replace its default model and settings (later turns use them)."""
    chat = get_chat_or_404(db, chat_id, caller)
    if body.title is not None:
        chat.title = body.title
    if body.settings is not None:
        settings = body.settings.model_dump()
        settings["model_id"] = resolve_model_name(db, body.settings.model_id)
        chat.settings = settings
    chat.updated_at = utcnow()
    db.commit()
    db.refresh(chat)
    return chat


def list_chats(db: Session, caller: Caller, limit: int, offset: int) -> tuple[list[ChatSession], int]:
    q = visible(select(ChatSession), caller)
    rows = list(db.scalars(q.order_by(ChatSession.updated_at.desc()).limit(limit).offset(offset)))
    return rows, db.scalar(select(func.count()).select_from(q.subquery())) or 0


def history(chat: ChatSession) -> list[dict[str, str]]:
    """The turns the model sees: answered user/assistant pairs (its own raw words, not filled slots)."""
    turns: list[dict[str, str]] = []
    for m in chat.messages:
        if m.role == "user":
            turns.append({"role": "user", "content": m.content})
        elif m.status == "done" and (m.raw_content or m.content).strip():
            turns.append({"role": "assistant", "content": m.raw_content or m.content})
        elif turns and turns[-1]["role"] == "user":
            turns.pop()  # a failed, cancelled (or empty) reply: drop the unanswered question
    return turns


def _reply_settings(db: Session, chat: ChatSession, body: MessageCreate) -> dict[str, Any]:
    """The chat's settings with this message's overrides; the model looked up once, by name."""
    overrides = body.model_dump(exclude_none=True, exclude={"content"})
    settings = {**chat.settings, **overrides}
    if "model_id" in overrides:
        settings["model_id"] = resolve_model_name(db, settings["model_id"])
        return settings
    model = find_model(db, settings.get("model_id", "baseline"))
    if model is None:
        raise HTTPException(status_code=422, detail=(
            f"this chat's model {settings.get('model_id')!r} no longer exists (deleted?); send model_id to pick "
            "another (GET /models lists them), or PATCH the chat's settings"))
    settings["model_id"] = model.name
    return settings


def post_message(db: Session, chat_id: int, body: MessageCreate, caller: Caller) -> MessageAccepted:
    """Store the user's turn and a pending assistant turn, and enqueue the job that answers it."""
    chat = get_chat_or_404(db, chat_id, caller)
    check_message(body.content)
    settings = _reply_settings(db, chat, body)
    request = GenerateRequest.model_validate({**settings, "messages": [*history(chat), {"role": "user",
                                                                                  "content": body.content}]})
    user = ChatMessage(chat_id=chat.id, role="user", content=body.content, status="done")
    assistant = ChatMessage(chat_id=chat.id, role="assistant", content="", status="pending",
                            model_name=settings["model_id"], settings=settings)
    db.add_all([user, assistant])
    db.flush()
    params = job_params(db, request, ReplyTo(chat_id=chat.id, message_id=assistant.id))
    chat.updated_at = utcnow()
    if chat.title == "New chat":
        chat.title = body.content.strip()[:60]
    job = jobs.submit(db, JobKind.GENERATE, params, caller=caller, undo=[user, assistant],
                           before_commit=lambda j: setattr(assistant, "job_id", j.id))
    return MessageAccepted(user_message=MessagePublic.model_validate(user),
                           assistant_message=MessagePublic.model_validate(assistant), job=JobPublic.model_validate(job))


def feedback(db: Session, chat_id: int, message_id: int, body: Feedback, caller: Caller) -> ChatMessage:
    """Thumbs up/down and an optional corrected reply: raw material for training, and for the answer memory.

    Approving a reply (up) or correcting it adds the answer (as corrected) to the memory, searchable
    at once; rating down without a correction takes an earlier approval back out.
    """
    get_chat_or_404(db, chat_id, caller)
    msg = db.get(ChatMessage, message_id)
    if msg is None or msg.chat_id != chat_id:
        raise HTTPException(status_code=404, detail=f"message {message_id} not found in chat {chat_id}")
    if msg.role != "assistant":
        raise HTTPException(status_code=422, detail="feedback is for assistant replies, not user messages")
    corrected = (body.corrected_reply or "").strip() or None
    if body.corrected_reply is None:  # not sent: an earlier correction stands (👍 after 👎-with-a-fix approves the fix)
        corrected = msg.corrected_reply
    approved = corrected or (msg.raw_content or msg.content if body.rating == "up" else None)
    if approved and msg.status != "done" and not corrected:
        raise HTTPException(status_code=409, detail=f"this reply is {msg.status}: only a finished reply can be "
                                                    "approved (send corrected_reply to give the right answer)")
    msg.feedback = body.rating
    if body.corrected_reply is not None:
        msg.corrected_reply = corrected
    if approved:
        memory.approve(db, msg, approved)
    else:
        memory.withdraw(db, msg)
    db.commit()
    db.refresh(msg)
    return msg
