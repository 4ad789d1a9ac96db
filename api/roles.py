"""Every route states its role, once: the ``Agent`` or ``Admin`` caller it takes (``api.deps``).

``RoleRoute`` reads that back from the route's dependencies into the OpenAPI document
(``x-csra-role``, and a line of the description), and refuses to build a route that states none, so a
new route cannot be left open by forgetting it. Routers use it as ``APIRouter(route_class=RoleRoute)``;
only ``/health`` is public.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.deps import require_admin, require_agent
from db.keys import Role

ROLE_OF = {require_admin: Role.ADMIN, require_agent: Role.AGENT}


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def route_role(dependant: Dependant) -> Role | None:
    """The strictest role among a route's dependencies, or None when it states none."""
    roles = {ROLE_OF[c] for c in _calls(dependant) if c in ROLE_OF}
    return Role.ADMIN if Role.ADMIN in roles else (Role.AGENT if roles else None)


class RoleRoute(APIRoute):
    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        role = route_role(self.dependant)
        if role is None:
            raise TypeError(f"route {sorted(self.methods or ())} {path} ({endpoint.__name__}) states no role: take the "
                            "caller as api.deps.Agent or api.deps.Admin")
        self.openapi_extra = {**(self.openapi_extra or {}), "x-csra-role": role.value}
        who = "any API key (agent or admin)" if role is Role.AGENT else "an admin key"
        self.description = f"{self.description}\n\nRole: **{role.value}** ({who}).".strip()
