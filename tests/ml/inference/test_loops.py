"""The loop guard: a reply may not repeat a run of n tokens it already holds."""

from __future__ import annotations

import pytest

from csra.specs import EvaluateSpec, GenerationOverrides, Grounding, loop_guard
from ml.inference.loops import LoopGuard, repeated_runs


def repeats(reply: list[int], n: int) -> bool:
    runs = [tuple(reply[i:i + n]) for i in range(len(reply) - n + 1)]
    return len(runs) != len(set(runs))


def test_the_token_that_would_repeat_a_run_is_banned() -> None:
    guard = LoopGuard(3)
    reply = [5, 6, 7, 8, 5, 6]
    assert guard.banned(reply[:1]) == [] and guard.banned(reply) == [7]  # 5 6 7 is already there
    assert guard.banned([*reply, 9]) == []  # grown by one token: 6 9 was never followed
    assert guard.banned([*reply, 9, 5, 6]) == [7, 9]  # incremental: as if it had seen the whole reply
    assert LoopGuard.of([5, 6, 7, 8, 5, 6, 9, 5, 6], 3).banned([5, 6, 7, 8, 5, 6, 9, 5, 6]) == [7, 9]
    assert LoopGuard(0).banned([1, 1, 1, 1]) == []  # off


def test_a_reply_may_repeat_what_its_approved_answers_repeat() -> None:
    answers = [(1, 2, 3, 9, 1, 2, 3), (4, 5, 6, 4, 5, 7)]
    assert repeated_runs(answers, 3) == {(1, 2, 3)} and repeated_runs(answers, 2) == {(1, 2), (2, 3), (4, 5)}
    guard = LoopGuard(3, repeated_runs(answers, 3))
    assert guard.banned([1, 2, 3, 8, 1, 2]) == []  # 1 2 3 twice: an answer does it too
    assert guard.banned([1, 2, 3, 8, 1, 2, 3, 8, 1, 2, 3, 8]) == [1]  # 8 1 2 ... no answer repeats 3 8 1


def test_a_guarded_greedy_walk_never_repeats_a_run() -> None:
    """Whatever the model prefers, the guard leaves a repeat at most n - 1 tokens long."""
    for n in (2, 4, 16):
        guard, reply = LoopGuard(n), []
        for step in range(200):
            preferred = [step % 7, step % 3, *range(1000)]  # a model that loops
            banned = set(guard.banned(reply))
            reply.append(next(t for t in preferred if t not in banned))
        assert not repeats(reply, n)


def test_where_the_loop_guard_comes_from() -> None:
    grounded = Grounding(no_repeat_ngram_size=16)
    assert loop_guard(grounded, None) == 16 and loop_guard(grounded, 0) == 0  # a request's own wins
    assert loop_guard(None, None) == 0 and loop_guard(None, 12) == 12  # ungrounded: off unless asked
    for bad in (1, -1, 65):
        with pytest.raises(ValueError, match="no_repeat_ngram_size"):
            GenerationOverrides(no_repeat_ngram_size=bad)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        EvaluateSpec(model_ids=["baseline"], dataset_id=1, no_repeat_ngram_size=1)
