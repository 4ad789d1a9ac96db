"""The copy bias's lookup (``ml.inference.copying``): which tokens continue a reply along its guides."""

from __future__ import annotations

from ml.inference.copying import END, Guides


def test_the_longest_suffix_a_guide_holds_chooses_the_next_tokens() -> None:
    guides = Guides.build([[1, 2, 3, 4], [1, 5, 3, 6], []])
    assert guides.next_tokens([]) == {1}  # a reply starts with a guide's first token
    assert guides.next_tokens([1]) == {2, 5}  # both guides go on from 1
    assert guides.next_tokens([9, 1, 2, 3]) == {4}  # "2 3" is only in the first: not 6
    assert guides.next_tokens([5, 3]) == {6}
    assert guides.next_tokens([7, 3]) == {4, 6}  # only "3" matches: either guide's next token
    assert guides.next_tokens([2, 3, 4]) == {END}  # the first guide ends here
    assert guides.next_tokens([1, 2, 7]) == frozenset()  # left the guides: no nudge until it meets them again
    assert guides.next_tokens([1, 2, 7, 5]) == {3}  # ... and back on one


def test_a_repeated_phrase_is_told_apart_by_what_came_before() -> None:
    guide = [10, 11, 12, 20, 30, 11, 12, 21]  # "11 12" twice, followed by 20 and then by 21
    guides = Guides.build([guide])
    assert guides.next_tokens([10, 11, 12]) == {20}
    assert guides.next_tokens([30, 11, 12]) == {21}
    assert guides.next_tokens([99, 11, 12]) == {20, 21}
    assert Guides.build([guide], max_match=1).next_tokens([10, 11, 12]) == {20, 21}


def test_a_reply_completes_a_guide_only_with_its_whole_ending() -> None:
    long_guide, short_guide = list(range(100, 112)), [7, 8]
    guides = Guides.build([long_guide, short_guide], max_match=4)
    assert guides.completes([1, 2, *long_guide[-4:]]) and guides.completes([5, 7, 8])
    assert not guides.completes(long_guide[-3:])  # 3 of the last 4: a shared word, not the end of the answer
    assert not guides.completes([*long_guide[-4:], 1]) and not guides.completes([8]) and not guides.completes([])
