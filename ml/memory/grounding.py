"""Grounding a reply on approved answers: the exemplars a prompt carries, and the placeholder contract.

A grounded model sees, with the customer's message, the approved answers to the most similar
messages (``ml.prompting.grounded_system``). Its reply may use the ``{{Slot}}`` placeholders the
company profile fills and those the exemplars use; any other slot is outside the contract and is
flagged to the agent (and counted by evaluation as ``slots_outside_contract``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from csra.profile import SLOT_RE, STANDARD_SLOTS, Profile


def slot_name(raw: str) -> str:
    return " ".join(raw.split()).lower()


def slots_in(text: str) -> dict[str, str]:
    """The ``{{Slot}}`` placeholders of ``text``: normalised name -> the spelling used."""
    return {slot_name(m.group(1)): m.group(0) for m in SLOT_RE.finditer(text)}


def profile_slots(profile: Profile | None) -> set[str]:
    """The slots the company profile fills (every standard one, and each custom one)."""
    names = set(STANDARD_SLOTS)
    if profile is not None:
        names |= {slot_name(k) for k in profile.custom_slots}
    return names


def allowed_slots(profile: Profile | None, exemplars: Iterable[str]) -> set[str]:
    allowed = profile_slots(profile)
    for text in exemplars:
        allowed |= set(slots_in(text))
    return allowed


def outside_contract(reply: str, allowed: set[str]) -> list[str]:
    """The placeholders of ``reply`` that neither the profile nor the exemplars know, as written."""
    return sorted(spelling for name, spelling in slots_in(reply).items() if name not in allowed)


def reply_floor(tokenizer: Any, nearest_reply: str | None, share: float, max_new_tokens: int) -> int:
    """The fewest tokens a grounded reply may have: ``share`` of the nearest approved answer's length
    (0 without a floor or an answer), below ``max_new_tokens``."""
    if share <= 0 or not nearest_reply:
        return 0
    length = len(tokenizer(nearest_reply, add_special_tokens=False)["input_ids"])
    return max(0, min(int(share * length), max_new_tokens - 1))
