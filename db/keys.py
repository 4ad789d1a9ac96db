"""Named API keys with roles: created, listed, revoked and looked up, stored as hashes only.

A key is 32 random bytes (``secrets.token_urlsafe``), so a single SHA-256 is enough to store it: slow
password hashes (bcrypt, argon2) exist to protect guessable secrets, and would cost every request tens of
milliseconds for nothing here. The key is shown once, when it is created.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import ApiKey

KEY_PREFIX = "csra_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class Role(enum.StrEnum):
    """What a key may do. Agents chat, give feedback, export their own chats and read models,
    evaluations and the profile; admins also import datasets, train, evaluate, delete, edit the profile
    and the answer memory, and see every owner's rows."""

    AGENT = "agent"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        return self is Role.ADMIN or needed is Role.AGENT


class KeyProblem(ValueError):
    """A key operation that cannot be done (a taken name, an unknown key); the message says why."""


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    secret: str  # shown once; only its hash is stored


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(db: Session, name: str, role: Role, *, reserved: frozenset[str] = frozenset()) -> NewKey:
    if not NAME_PATTERN.fullmatch(name):
        raise KeyProblem(f"invalid key name {name[:80]!r}: use 1-64 letters, digits and . _ @ -, "
                        "starting with a letter or digit")
    if name in reserved:
        raise KeyProblem(f"the name {name!r} is the bootstrap key's (CSRA_API_KEY_NAME); choose another")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, role=role.value, key_hash=hash_key(secret), prefix=secret[:12])
    db.add(row)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise KeyProblem(f"a key named {name!r} already exists (revoked keys keep their names: "
                        "the rows they made still carry them)") from None
    return NewKey(row=row, secret=secret)


def list_keys(db: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(db.scalars(q))


def revoke_key(db: Session, name: str) -> ApiKey:
    row = db.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise KeyProblem(f"no key named {name[:80]!r} (csra keys list shows them)")
    if row.revoked_at is not None:
        raise KeyProblem(f"the key {name!r} was already revoked on {row.revoked_at:%Y-%m-%d %H:%M} UTC")
    row.revoked_at = utcnow()
    db.commit()
    return row


def find_key(db: Session, secret: str) -> ApiKey | None:
    """The live key whose secret this is, or None (unknown or revoked)."""
    if not secret.startswith(KEY_PREFIX):
        return None
    return db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)))
