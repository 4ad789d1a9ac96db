"""The company profile and the filling of Bitext-style ``{{Slot}}`` placeholders."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

SLOT_RE = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")

# Bitext slot names -> profile fields
STANDARD_SLOTS = {
    "company name": "company_name",
    "website url": "website_url",
    "customer support phone number": "support_phone",
    "customer support email": "support_email",
    "customer support hours": "support_hours",
}


class Profile(BaseModel):
    company_name: str = ""
    website_url: str = ""
    support_phone: str = ""
    support_email: str = ""
    support_hours: str = ""
    custom_slots: dict[str, str] = Field(default_factory=dict, description="any other slot: name -> value")


def slot_values(profile: Profile) -> dict[str, str]:
    values = {slot: getattr(profile, field) for slot, field in STANDARD_SLOTS.items()}
    values.update({k.strip().lower(): v for k, v in profile.custom_slots.items()})
    return {k: v for k, v in values.items() if v}


def fill_placeholders(text: str, profile: Profile) -> str:
    """Replace ``{{Slot}}`` with the profile's value; slots without a value stay as they are."""
    values = slot_values(profile)

    def sub(m: re.Match[str]) -> str:
        return values.get(" ".join(m.group(1).split()).lower(), m.group(0))

    return SLOT_RE.sub(sub, text)
