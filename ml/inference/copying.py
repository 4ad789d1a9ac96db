"""Copy bias: decoding a grounded reply along the approved answers it was grounded on.

A grounded model sees only the first tokens of each exemplar (``Grounding.max_exemplar_tokens``), and
its greedy replies say less than the approved answers do. With a copy bias, every decode step adds
``bias`` to the logits of the token that continues the reply along each *whole* exemplar (a "guide"),
or of the end token where a guide ends. Each guide has a head that only moves forward: the
continuation is the one after the reply's longest suffix found *ahead* of where the reply already
was in that guide (its first such place), so the bias never leads the reply back over what it
already followed (it does not feed a loop). The model stays free to leave a guide (another opening,
the customer's own details) and meets it again further on. Bias 0 changes nothing.

Hand-written because no kept library does this at decode time: transformers' ``sequence_bias``
boosts fixed sequences wherever they occur, not the continuation of the text so far, and prompt-lookup
decoding proposes the same continuations only to verify them (it never changes the text). The n-gram
table is built once per request, so a step costs at most ``max_match`` dict lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

END = -1  # in ``next_tokens``: a guide ends here (the caller boosts its end tokens)
MAX_MATCH = 8  # the longest suffix looked up: long enough to tell a guide's repeated phrases apart


@dataclass(frozen=True)
class Guides:
    """The guides and where each n-gram (1 to ``max_match`` tokens) of them ends: n-gram -> (guide, position
    of the token after it), in order."""

    guides: tuple[tuple[int, ...], ...]
    spots: dict[tuple[int, ...], tuple[tuple[int, int], ...]]
    max_match: int = MAX_MATCH

    @classmethod
    def build(cls, guides: Sequence[Sequence[int]], max_match: int = MAX_MATCH) -> Guides:
        kept = tuple(tuple(g) for g in guides if len(g))
        spots: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for g, ids in enumerate(kept):
            for j in range(1, len(ids) + 1):
                for n in range(1, min(max_match, j) + 1):
                    spots.setdefault(ids[j - n:j], []).append((g, j))
        return cls(kept, {k: tuple(v) for k, v in spots.items()}, max_match)

    def following(self, g: int, j: int) -> int:
        return self.guides[g][j] if j < len(self.guides[g]) else END


@dataclass
class Copier:
    """One reply's progress along its guides: ``next_tokens`` is asked once per decode step."""

    guides: Guides
    heads: list[int] = field(default_factory=list)  # per guide: the reply has followed it up to here
    steps: int = -1  # the longest prefix already stepped through
    last: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.heads = [0] * len(self.guides.guides)

    def next_tokens(self, generated: Sequence[int]) -> frozenset[int]:
        """The tokens that continue ``generated`` along the guides (``END``: a guide ends here). Prefixes not
        seen yet are stepped through first, so a fresh copier replays a whole reply (beam search)."""
        for t in range(self.steps + 1, len(generated) + 1):
            self.last = self._step(generated[max(0, t - self.guides.max_match):t], t)
        self.steps = max(self.steps, len(generated))
        return self.last

    def _step(self, tail: Sequence[int], length: int) -> frozenset[int]:
        if length == 0:  # the start of a reply: each guide's first token
            return frozenset(g[0] for g in self.guides.guides)
        for n in range(len(tail), 0, -1):
            ahead: dict[int, int] = {}
            for g, j in self.guides.spots.get(tuple(tail[len(tail) - n:]), ()):
                if j > self.heads[g] and g not in ahead:  # spots are in order: the first one ahead
                    ahead[g] = j
            if ahead:
                for g, j in ahead.items():
                    self.heads[g] = j
                return frozenset(self.guides.following(g, j) for g, j in ahead.items())
        return frozenset()
