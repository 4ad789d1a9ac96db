"""The company profile that fills ``{{Slot}}`` placeholders in replies shown to agents."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import DbSession, Owner
from csra.profile import Profile
from db.models import Setting

router = APIRouter(prefix="/profile", tags=["profile"])


@router.get("", response_model=Profile)
def read_profile(db: DbSession, owner: Owner) -> Profile:
    row = db.get(Setting, "profile")
    return Profile.model_validate(row.value if row else {})


@router.put("", response_model=Profile)
def write_profile(profile: Profile, db: DbSession, owner: Owner) -> Profile:
    row = db.get(Setting, "profile")
    if row is None:
        db.add(Setting(key="profile", value=profile.model_dump()))
    else:
        row.value = profile.model_dump()
    db.commit()
    return profile
