"""Chats: sessions with stored turns, replies as generation jobs, feedback, streamed exports."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from api.deps import Agent, DbSession
from api.params import IdPath, Limit, Offset, Since
from api.roles import RoleRoute
from api.schemas.chats import (
    ChatCreate,
    ChatPublic,
    ChatsPublic,
    ChatUpdate,
    ExportFormat,
    Feedback,
    MessageAccepted,
    MessageCreate,
    MessagePublic,
)
from api.services import chats
from api.services.exports import EXPORT_RESPONSES, export_lines, export_response
from db.models import ChatMessage, ChatSession

router = APIRouter(route_class=RoleRoute, prefix="/chats", tags=["chats"])


@router.post("", status_code=201, response_model=ChatPublic)
def create_chat(body: ChatCreate, db: DbSession, caller: Agent) -> ChatSession:
    return chats.create_chat(db, body, caller)


@router.patch("/{chat_id}", response_model=ChatPublic)
def update_chat(chat_id: IdPath, body: ChatUpdate, db: DbSession, caller: Agent) -> ChatSession:
    """Rename a chat or replace its default model and settings (later turns use them)."""
    return chats.update_chat(db, chat_id, body, caller)


@router.get("", response_model=ChatsPublic)
def list_chats(db: DbSession, caller: Agent, limit: Limit = 50, offset: Offset = 0) -> ChatsPublic:
    rows, count = chats.list_chats(db, caller, limit, offset)
    return ChatsPublic(data=[ChatPublic(id=c.id, title=c.title, owner=c.owner, settings=c.settings,
                                        created_at=c.created_at,
                                        updated_at=c.updated_at) for c in rows], count=count)


@router.get("/export", responses=EXPORT_RESPONSES)
def export_chats(
    db: DbSession, caller: Agent, format: ExportFormat = "jsonl", since: Since = None,
    model: str | None = Query(None, description="only chats with a reply from this model"),
) -> StreamingResponse:
    """Every visible chat, streamed page by page (10,000 chats never sit in memory at once)."""
    return export_response(export_lines(format, caller, since=since, model=model), format, "chats")


@router.get("/{chat_id}", response_model=ChatPublic)
def read_chat(chat_id: IdPath, db: DbSession, caller: Agent) -> ChatSession:
    return chats.get_chat_or_404(db, chat_id, caller)


@router.delete("/{chat_id}", status_code=204)
def delete_chat(chat_id: IdPath, db: DbSession, caller: Agent) -> Response:
    db.delete(chats.get_chat_or_404(db, chat_id, caller))
    db.commit()
    return Response(status_code=204)


@router.post("/{chat_id}/messages", status_code=202, response_model=MessageAccepted)
def post_message(chat_id: IdPath, body: MessageCreate, db: DbSession, caller: Agent) -> MessageAccepted:
    """Store the user's turn, enqueue the reply; the assistant turn is filled in when the job ends."""
    return chats.post_message(db, chat_id, body, caller)


@router.post("/{chat_id}/messages/{message_id}/feedback", response_model=MessagePublic)
def message_feedback(chat_id: IdPath, message_id: IdPath, body: Feedback, db: DbSession, caller: Agent) -> ChatMessage:
    """Thumbs up/down and an optional corrected reply: raw material for later training."""
    return chats.feedback(db, chat_id, message_id, body, caller)


@router.get("/{chat_id}/export", responses=EXPORT_RESPONSES)
def export_chat(chat_id: IdPath, db: DbSession, caller: Agent, format: ExportFormat = "jsonl") -> StreamingResponse:
    chats.get_chat_or_404(db, chat_id, caller)
    return export_response(export_lines(format, caller, chat_id=chat_id), format, f"chat-{chat_id}")
