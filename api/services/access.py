"""Who is calling, and which rows they may see: the one place owners are enforced.

Agents see the jobs and chats they made (their key's name is the owner); admins see every owner's rows,
and so does the local caller while no API key is configured (only loopback may call then). Models and
evaluations are the team's shared catalogue, readable by every agent; datasets (raw customer
conversations) only by admins. Rows made before keys were on have no owner: only admins see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.orm import InstrumentedAttribute

from db.keys import Role

Q = TypeVar("Q")


@dataclass(frozen=True)
class Caller:
    name: str | None  # the key's name: the owner of what this caller makes; None while no key is configured
    role: Role

    @property
    def scope(self) -> str | None:
        """The only owner whose rows this caller may see, or None for all of them."""
        return None if self.role is Role.ADMIN else self.name


LOCAL = Caller(name=None, role=Role.ADMIN)


def owned(q: Any, column: InstrumentedAttribute[Any], caller: Caller) -> Any:
    """``q`` limited to the rows ``caller`` may see (``column`` is the table's ``owner``)."""
    return q if caller.scope is None else q.where(column == caller.scope)


def may_see(owner: str | None, caller: Caller) -> bool:
    return caller.scope is None or owner == caller.scope
