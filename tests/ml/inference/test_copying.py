"""The copy bias's lookup (``ml.inference.copying``): which tokens continue a reply along its guides."""

from __future__ import annotations

from collections.abc import Sequence

from ml.inference.copying import END, Copier, Guides


def follow(guides: Guides, reply: Sequence[int]) -> frozenset[int]:
    return Copier(guides).next_tokens(reply)


def test_the_longest_suffix_a_guide_holds_chooses_the_next_tokens() -> None:
    guides = Guides.build([[1, 2, 3, 4], [1, 5, 3, 6], []])
    assert follow(guides, []) == {1}  # a reply starts with a guide's first token
    assert follow(guides, [1]) == {2, 5}  # both guides go on from 1
    assert follow(guides, [9, 1, 2, 3]) == {4}  # "2 3" is only in the first: not 6
    assert follow(guides, [5, 3]) == {6}
    assert follow(guides, [7, 3]) == {4, 6}  # only "3" matches: either guide's next token
    assert follow(guides, [2, 3, 4]) == {END}  # the first guide ends here
    assert follow(guides, [1, 2, 7]) == frozenset()  # left the guides: no nudge until it meets them again
    assert follow(guides, [1, 2, 7, 5]) == {3}  # ... and back on one


def test_a_guide_is_followed_forward_only() -> None:
    guide = [10, 11, 12, 20, 30, 11, 12, 21]  # "11 12" twice: followed by 20, then by 21
    guides = Guides.build([guide])
    copier, reply, nudged = Copier(guides), [], []
    for token in guide:  # step by step, as a decode loop asks
        nudged.append(copier.next_tokens(reply))
        reply.append(token)
    assert nudged == [{t} for t in guide] and copier.next_tokens(reply) == {END}
    assert follow(guides, [10, 11, 12]) == {20} and follow(guides, [30, 11, 12]) == {21}
    assert follow(guides, [99, 11, 12]) == {20}  # the first place ahead
    # a reply that goes back over what it followed is not led round again (no bias feeds a loop)
    assert follow(guides, [10, 11, 12, 20, 30, 11, 12]) == {21}
    assert follow(guides, [10, 11, 12, 20, 30, 11, 12, 21, 11, 12]) == frozenset()
    assert follow(Guides.build([guide], max_match=1), [10, 11, 12, 20, 30, 11, 12]) == {21}
