"""The loop guard: a reply may not repeat a run of ``n`` tokens it already wrote.

Small models fall into loops in long lists: the same numbered item, word for word, until the token
limit (on Bitext's validation split, 4% of a grounded SmolLM2's replies; every one of them in the
metric's ``repetitive``). The guard bans the token that would complete an ``n``-token run the reply
already holds, so a repeat can last at most ``n - 1`` tokens. Only the reply counts, never the prompt:
a grounded reply may copy its exemplars' runs (``ml.inference.copying``), and may repeat a run where
one of them repeats it too.

The idea is transformers' ``no_repeat_ngram_size``; written here because that processor also counts
the prompt of a decoder-only model (it would forbid copying an exemplar) and works on whole batches
of ``input_ids``, while csra's engines steer one row at a time (``Row.steer``, both backends).
Incremental: each step adds one run and looks one up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def repeated_runs(texts: Sequence[Sequence[int]], n: int) -> frozenset[tuple[int, ...]]:
    """The runs of ``n`` tokens that one of ``texts`` holds more than once (the repeats an approved answer
    makes itself, e.g. "you may be eligible for a refund" closing each item of a list)."""
    found: set[tuple[int, ...]] = set()
    for text in texts:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(text) - n + 1):
            run = tuple(text[i:i + n])
            (found if run in seen else seen).add(run)
    return frozenset(found)


@dataclass
class LoopGuard:
    """The runs of ``n`` tokens a reply holds, as "``n - 1`` tokens -> the tokens that followed them".

    ``allowed``: runs the reply may repeat (``repeated_runs`` of its guides: a grounded reply may repeat
    itself where its approved answers do)."""

    n: int
    allowed: frozenset[tuple[int, ...]] = frozenset()
    _after: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    _counted: int = 0  # how many tokens of the reply are in ``_after``

    @classmethod
    def of(cls, reply: Sequence[int], n: int, allowed: frozenset[tuple[int, ...]] = frozenset()) -> LoopGuard:
        """A guard that has seen ``reply`` (beam search: each beam's reply differs)."""
        guard = cls(n, allowed)
        guard.banned(reply)
        return guard

    def banned(self, reply: Sequence[int]) -> list[int]:
        """The tokens that may not follow ``reply`` (the same reply, grown since the last call)."""
        if self.n < 2:  # 0: off (1 would ban every token already used)
            return []
        for end in range(max(self._counted, self.n), len(reply) + 1):
            self._after.setdefault(tuple(reply[end - self.n:end - 1]), set()).add(reply[end - 1])
        self._counted = max(self._counted, len(reply))
        if len(reply) < self.n - 1:
            return []
        tail = tuple(reply[len(reply) - self.n + 1:])
        return sorted(t for t in self._after.get(tail, ()) if (*tail, t) not in self.allowed)
