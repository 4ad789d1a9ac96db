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

import sacrebleu

from csra.profile import SLOT_RE, STANDARD_SLOTS, Profile
from csra.specs import ANSWER_ROOM, REPLY_TOKENS, Grounding, loop_guard
from ml.memory.memory import Hit


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


def by_consensus(replies: Sequence[str]) -> list[int]:
    """The replies' indices, those that agree most with the others first (ties: the nearer first).

    Agreement is a reply's mean sentence BLEU against each other reply: the answer the nearest
    approved answers share most of (their medoid), rather than the nearest one's own wording.
    Minimum-Bayes-risk selection; sacrebleu's BLEU is the metric the README reports, so agreement
    is measured the same way.
    """
    n = len(replies)
    if n < 3:  # with two, each agrees with the other equally
        return list(range(n))
    agreement = [sum(sacrebleu.sentence_bleu(replies[i], [replies[j]]).score for j in range(n) if j != i)
                 for i in range(n)]
    return sorted(range(n), key=lambda i: -agreement[i])


def grounding_exemplars(grounding: Grounding, nearest: Sequence[Hit]) -> list[Hit]:
    """The approved answers a grounded prompt carries, in its order, from the nearest (nearest first).

    ``consensus_pool`` 0: the ``k`` nearest. Otherwise, of that many nearest, those of the nearest
    answer's intent (all of them when it has none), the ``k`` that agree most with the others first
    (``by_consensus``), then the nearest others if that intent has fewer than ``k``. The nearest
    answer decides the intent because it is right more often than the pool's majority (on Bitext's
    validation split, where edit_account and switch_account share neighbours, the majority cost
    intent match); consensus then picks the wording within it.
    """
    return choose_answers(nearest, grounding.k, grounding.consensus_pool)


def choose_answers(nearest: Sequence[Hit], k: int, consensus_pool: int) -> list[Hit]:
    """``grounding_exemplars`` by its two numbers: also the ``retrieval-consensus`` responder's answer
    (``k`` 1: the grounded model's first exemplar, shown as the reply itself)."""
    if consensus_pool == 0:
        return list(nearest[:k])
    pool = list(nearest[: max(k, consensus_pool)])
    intent = pool[0].entry.intent if pool else ""
    same = [h for h in pool if h.entry.intent == intent] if intent else pool
    chosen = [same[i] for i in by_consensus([h.entry.reply for h in same])][:k]
    others = [h for h in pool if all(h is not c for c in chosen)]
    return chosen + others[: k - len(chosen)]


def training_grounding(grounding: Grounding) -> Grounding:
    """How training grounds an example: on the answers to its ``k`` nearest training messages, not on the
    consensus exemplars that chat and evaluation choose (``consensus_pool`` 0).

    The measured grounded model was trained this way. One trained on consensus exemplars (the same 1,200
    Bitext rows and 150 steps) scored lower on the validation split, BLEU 31.7 and chrF 51.2 against 33.0
    and 51.8, though served with other decode values (README, "Following the consensus exemplar"): only 25
    of its 300 replies were its first exemplar word for word, so it seems to learn not to follow it.
    """
    return grounding.model_copy(update={"consensus_pool": 0})


def answers_needed(grounding: Grounding | None) -> int:
    """How many nearest approved answers ``grounding_exemplars`` chooses from (0: ungrounded)."""
    return max(grounding.k, grounding.consensus_pool) if grounding else 0



@dataclass(frozen=True)
class Steering:
    """How decoding holds a reply to its exemplars and out of loops, and how long it may run: the
    ``GenerationRequest`` fields of the same names."""

    max_new_tokens: int = REPLY_TOKENS
    min_new_tokens: int = 0
    guides: tuple[tuple[int, ...], ...] = ()
    copy_bias: float = 0.0
    copy_guides: int = 0
    no_repeat_ngram_size: int = 0


def follows_approved(grounding: Grounding, similarity: float | None) -> bool:
    """Whether the copy bias and the length floor hold a reply to its exemplars: the nearest approved answer's
    message is at least ``grounding.min_similarity`` like the customer's (None: not known, so yes)."""
    return similarity is None or similarity >= grounding.min_similarity


def steering(tokenizer: Any, grounding: Grounding | None, exemplars: Sequence[str], max_new_tokens: int,
             no_repeat_ngram_size: int | None = None, similarity: float | None = None) -> Steering:
    """A reply's loop guard (``no_repeat_ngram_size``, else a grounded model's own) and a grounded reply's
    length floor (``grounding.length_floor`` of the first exemplar's length, below
    ``max_new_tokens``) and copy guides (the whole exemplars, in the prompt's order: the copy bias follows
    the first ``copy_exemplars`` of them, the loop guard allows every one's own repeats); neither of the
    last two for an ungrounded model or without exemplars. ``similarity``: the nearest approved answer's
    (its message's cosine to the customer's); below ``grounding.min_similarity`` neither the floor nor the
    copy bias holds the reply to exemplars that answer another question. The reply's limit is
    ``max_new_tokens``, raised while the copy bias holds it to answers longer than that: to the longest
    of them plus ``ANSWER_ROOM`` (the engines still cut it to what the model's context holds)."""
    guard = loop_guard(grounding, no_repeat_ngram_size)
    if grounding is None or not exemplars:
        return Steering(max_new_tokens, no_repeat_ngram_size=guard)
    if not follows_approved(grounding, similarity):
        grounding = grounding.model_copy(update={"length_floor": 0.0, "copy_bias": 0.0})

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    # guides: what the copy bias follows, and whose own repeats the loop guard allows
    guides = tuple(ids(x) for x in exemplars) if grounding.copy_bias > 0 or guard >= 2 else ()
    floor = 0
    if grounding.length_floor > 0:  # the first exemplar is tokenized once, also when it is a guide
        first = len(guides[0]) if guides else len(ids(exemplars[0]))
        floor = max(0, min(int(grounding.length_floor * first), max_new_tokens - 1))
    if not (guides and grounding.copy_bias > 0):
        return Steering(max_new_tokens, floor, guides, no_repeat_ngram_size=guard)
    followed = guides[:grounding.copy_exemplars] if grounding.copy_exemplars else guides
    limit = max(max_new_tokens, max(len(g) for g in followed) + ANSWER_ROOM)
    return Steering(limit, floor, guides, grounding.copy_bias, grounding.copy_exemplars, guard)
