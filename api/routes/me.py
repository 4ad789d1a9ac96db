"""Who the caller is: the key's name and role (the UI's sign-in checks a key with it)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Agent
from api.roles import RoleRoute
from api.schemas.keys import CallerPublic
from csra.settings import get_settings

router = APIRouter(route_class=RoleRoute, tags=["keys"])


@router.get("/me", response_model=CallerPublic)
def me(caller: Agent) -> CallerPublic:
    """The name and role of the key this request carries (``keys_on`` false: no key is configured)."""
    return CallerPublic(name=caller.name, role=caller.role.value, keys_on=bool(get_settings().api_key))
