"""Grounding a reply on approved answers: the exemplars a prompt carries, and the placeholder contract.

A grounded model sees, with the customer's message, the approved answers to the most similar
messages (``ml.prompting.grounded_system``). Its reply may use the ``{{Slot}}`` placeholders the
company profile fills and those the exemplars use; any other slot is outside the contract and is
flagged to the agent (and counted by evaluation as ``slots_outside_contract``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from csra.profile import SLOT_RE, STANDARD_SLOTS, Profile
from csra.specs import Grounding


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


@dataclass(frozen=True)
class Steering:
    """How decoding holds a grounded reply to its exemplars: the ``GenerationRequest`` fields of the same names."""

    min_new_tokens: int = 0
    guides: tuple[tuple[int, ...], ...] = ()
    copy_bias: float = 0.0


def steering(tokenizer: Any, grounding: Grounding | None, exemplars: Sequence[str], max_new_tokens: int) -> Steering:
    """A grounded reply's length floor (``grounding.length_floor`` of the nearest approved answer's length,
    below ``max_new_tokens``) and its copy guides (the whole exemplars, nearest first); nothing for an
    ungrounded model or without exemplars."""
    if grounding is None or not exemplars:
        return Steering()

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    guides = tuple(ids(x) for x in exemplars) if grounding.copy_bias > 0 else ()
    floor = 0
    if grounding.length_floor > 0:  # the nearest answer is tokenized once, also when it is a guide
        nearest = len(guides[0]) if guides else len(ids(exemplars[0]))
        floor = max(0, min(int(grounding.length_floor * nearest), max_new_tokens - 1))
    return Steering(floor, guides, grounding.copy_bias if guides else 0.0)
