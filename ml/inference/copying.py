"""Copy bias: decoding a grounded reply along the approved answers it was grounded on.

A grounded model sees only the first tokens of each exemplar (``Grounding.max_exemplar_tokens``), and
its greedy replies say less than the approved answers do. With a copy bias, every decode step adds
``bias`` to the logits of the tokens that continue the reply's longest suffix found in one of the
*whole* exemplars (a "guide"), and of the end token where a guide ends there. The model stays free to
leave the guide (a different opening, the customer's own details); once its last tokens match a
guide again, it is nudged along that guide's next tokens. Bias 0 changes nothing.

Measured (README, "A copy bias"): a lookup of the suffix anywhere in the guides did better than one
that only lets each guide's place move forward (that variant's heads jumped ahead on short matches
and lost the text they skipped), and the three exemplars did better than the nearest one alone.

Hand-written because no kept library does this at decode time: transformers' ``sequence_bias``
boosts fixed sequences wherever they occur, not the continuation of the text so far, and prompt-lookup
decoding proposes the same continuations only to verify them (it never changes the text). It is a
lookup table of n-grams built once per request, so a step costs at most ``max_match`` dict lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

END = -1  # in ``next_tokens``: a guide ends here (the caller boosts its end tokens)
MAX_MATCH = 8  # the longest suffix looked up: long enough to tell a guide's repeated phrases apart


@dataclass(frozen=True)
class Guides:
    """Which tokens continue a text along some guide: suffix (up to ``max_match`` tokens) -> next tokens."""

    table: dict[tuple[int, ...], frozenset[int]]
    max_match: int = MAX_MATCH
    endings: frozenset[tuple[int, ...]] = frozenset()  # each guide's last max_match tokens (a shorter one: all)

    @classmethod
    def build(cls, guides: Sequence[Sequence[int]], max_match: int = MAX_MATCH) -> Guides:
        table: dict[tuple[int, ...], set[int]] = {}
        endings: set[tuple[int, ...]] = set()
        for guide in guides:
            ids = list(guide)
            if not ids:
                continue
            endings.add(tuple(ids[-max_match:]))
            table.setdefault((), set()).add(ids[0])  # the start of a reply: the guides' first tokens
            for j in range(1, len(ids) + 1):  # j: the position whose token follows the suffix
                following = ids[j] if j < len(ids) else END
                for n in range(1, min(max_match, j) + 1):
                    table.setdefault(tuple(ids[j - n:j]), set()).add(following)
        return cls({k: frozenset(v) for k, v in table.items()}, max_match, frozenset(endings))

    def completes(self, generated: Sequence[int]) -> bool:
        """Whether ``generated`` has just written a guide's ending: its last ``max_match`` tokens (all of a
        shorter guide), so a single shared token ("!") is not mistaken for the end of an answer."""
        return any(len(generated) >= len(e) and tuple(generated[len(generated) - len(e):]) == e
                   for e in self.endings)

    def next_tokens(self, generated: Sequence[int]) -> frozenset[int]:
        """The guides' continuations of the longest suffix of ``generated`` that they contain (at the
        start: their first tokens); empty when not even the last token occurs in a guide."""
        for n in range(min(self.max_match, len(generated)), 0, -1):
            found = self.table.get(tuple(generated[len(generated) - n:]))
            if found is not None:
                return found
        return self.table.get((), frozenset()) if not generated else frozenset()
