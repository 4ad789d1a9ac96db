"""Request dependencies: one DB session per request, API-key auth, settings."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from csra.settings import Settings, get_settings
from db.session import get_sessionmaker


def get_db() -> Iterator[Session]:
    """One session per request. A plain ``def``: FastAPI runs it (and closing the session, which
    talks to the database) in its thread pool, so a locked database never stalls the event loop."""
    with get_sessionmaker()() as session:
        yield session


async def require_key(request: Request) -> str | None:
    """When CSRA_API_KEY is set, every call but /health needs ``Authorization: Bearer <key>``.

    Returns the caller's owner id (a short, non-secret fingerprint of the key) or None.
    """
    settings = get_settings()
    if not settings.api_key:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compared as bytes (the header as sent: HTTP headers are latin-1); compare_digest refuses a str with
    # non-ASCII characters with a TypeError, which would be a 500 instead of a 401
    given, expected = token.strip().encode("latin-1", "replace"), settings.api_key.encode("utf-8")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send 'Authorization: Bearer <CSRA_API_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return owner_of(token.strip())


def owner_of(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:16]


DbSession = Annotated[Session, Depends(get_db)]
Owner = Annotated[str | None, Depends(require_key)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
