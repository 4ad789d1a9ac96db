"""Request dependencies: one DB session per request, the caller (API key and role), settings.

Every route takes its caller as ``Agent`` or ``Admin``: that parameter is the route's role, which
``api.roles`` reads back into the OpenAPI document (and refuses a route that states none).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from api.services.access import LOCAL, Caller
from csra.settings import Settings, get_settings
from db.base import utcnow
from db.keys import Role, find_key
from db.session import get_sessionmaker

LAST_USED_EVERY = timedelta(minutes=10)  # how stale ``csra keys list``'s "last used" may be (saves a write per call)


def get_db() -> Iterator[Session]:
    """One session per request. A plain ``def``: FastAPI runs it (and closing the session, which
    talks to the database) in its thread pool, so a locked database never stalls the event loop."""
    with get_sessionmaker()() as session:
        yield session


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def authenticate(request: Request, db: Annotated[Session, Depends(get_db)]) -> Caller:
    """The caller of a request. While CSRA_API_KEY is unset keys are off: the local caller is an admin
    (``api.guards`` lets only loopback in). Otherwise ``Authorization: Bearer`` must carry the bootstrap
    key (CSRA_API_KEY, an admin named CSRA_API_KEY_NAME) or a live key made with ``csra keys create``."""
    settings = get_settings()
    if not settings.api_key:
        return LOCAL
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (CSRA_API_KEY for the CLI and UI)")
    # compared as bytes (the header as sent: HTTP headers are latin-1); compare_digest refuses a str with
    # non-ASCII characters with a TypeError, which would be a 500 instead of a 401
    if hmac.compare_digest(token.encode("latin-1", "replace"), settings.api_key.encode("utf-8")):
        return Caller(name=settings.api_key_name, role=Role.ADMIN)
    key = find_key(db, token)
    if key is None:
        db.rollback()
        raise _unauthorized("wrong or revoked API key (csra keys list shows the live ones)")
    if key.name == settings.api_key_name:  # it would see and change everything the bootstrap key made
        db.rollback()
        raise _unauthorized(f"the key named {key.name!r} has the bootstrap key's name (CSRA_API_KEY_NAME) and is "
                            f"refused: revoke it (csra keys revoke {key.name}) and make one with another name")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_EVERY:
        key.last_used_at = now
    caller = Caller(name=key.name, role=Role(key.role))
    db.commit()  # ends the lookup's transaction: a long stream or upload holds no database connection for it
    return caller


def require_agent(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    """Any valid key: agents and admins."""
    return caller


def require_admin(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    if caller.role is not Role.ADMIN:
        raise HTTPException(status_code=403, detail=f"this needs an admin key; the key {caller.name!r} is an "
                                                    f"{caller.role.value} key")
    return caller


DbSession = Annotated[Session, Depends(get_db)]
Agent = Annotated[Caller, Depends(require_agent)]
Admin = Annotated[Caller, Depends(require_admin)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
