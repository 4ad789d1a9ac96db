"""The company profile that fills ``{{Slot}}`` placeholders in replies shown to agents."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Admin, Agent, DbSession
from api.roles import RoleRoute
from csra.profile import Profile
from db.models import Setting

router = APIRouter(route_class=RoleRoute, prefix="/profile", tags=["profile"])


@router.get("", response_model=Profile)
def read_profile(db: DbSession, caller: Agent) -> Profile:
    row = db.get(Setting, "profile")
    return Profile.model_validate(row.value if row else {})


@router.put("", response_model=Profile)
def write_profile(profile: Profile, db: DbSession, caller: Admin) -> Profile:
    row = db.get(Setting, "profile")
    if row is None:
        db.add(Setting(key="profile", value=profile.model_dump()))
    else:
        row.value = profile.model_dump()
    db.commit()
    return profile
