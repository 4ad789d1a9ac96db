"""The answer memory's parts: the ONNX embedder, the vector index, intent votes, the placeholder contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csra.profile import Profile
from csra.specs import ANSWER_ROOM, Grounding
from ml.memory.grounding import (
    Steering,
    allowed_slots,
    answers_needed,
    by_consensus,
    grounding_exemplars,
    outside_contract,
    slots_in,
    steering,
    training_grounding,
)
from ml.memory.index import VectorIndex
from ml.memory.memory import AnswerMemory, Entry, Hit, vote
from tests.fixtures_models import tiny_causal  # noqa: F401


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped MiniLM exported to ONNX (checked against sentence-transformers by the export itself)."""
    from ml.memory.export import export_embedder
    from ml.metrics import embedding_model_dir

    return export_embedder(embedding_model_dir(), tmp_path_factory.mktemp("embedder") / "embedder")


def unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_the_onnx_embedder_matches_sentence_transformers(exported: Path) -> None:
    from ml.memory.embedder import Embedder
    from ml.metrics import get_encoder

    texts = ["I want to cancel my order", "how do I get my money back", "reset password", ""]
    got = Embedder(exported).embed(texts)
    want = get_encoder().encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert got.shape == (4, 384) and np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert export_is_idempotent(exported)


def export_is_idempotent(folder: Path) -> bool:
    from ml.memory.export import export_embedder

    before = (folder / "model.onnx").stat().st_mtime_ns
    export_embedder(Path("/nonexistent"), folder)  # already there: the source is not even read
    return (folder / "model.onnx").stat().st_mtime_ns == before


def test_a_missing_export_is_a_clear_error(tmp_path: Path) -> None:
    from ml.memory.embedder import Embedder, EmbedderMissing

    with pytest.raises(EmbedderMissing, match="no exported embedding model"):
        Embedder(tmp_path)


def test_index_adds_removes_and_ranks_by_cosine() -> None:
    index = VectorIndex(ndim=3)
    index.add([10, 20, 30], unit([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1]]))
    found = index.search(unit([[1, 0, 0]])[0], 2, exact=True)
    assert [k for k, _ in found] == [10, 20] and found[0][1] == pytest.approx(1.0, abs=1e-5)
    index.remove(10)
    index.remove(10)  # twice: nothing happens
    assert [k for k, _ in index.search(unit([[1, 0, 0]])[0], 2)] == [20, 30]
    assert VectorIndex(ndim=3).search(unit([[1, 0, 0]])[0], 3) == []


def _memory() -> AnswerMemory:
    memory = AnswerMemory(exact=True, ndim=3)
    entries = [Entry(1, "cancel my order", "I'll cancel order {{Order Number}}.", "cancel_order", group="g1"),
               Entry(2, "please cancel the order", "Cancelled; see {{Website URL}}.", "cancel_order", group="g2"),
               Entry(3, "where is my refund", "Refunds take 5 days.", "track_refund", group="g3")]
    vecs = unit([[1, 0, 0], [0.95, 0.05, 0], [0, 1, 0]])
    memory.add(entries, vecs, vecs)
    return memory


def test_similar_answers_skip_the_same_leakage_group_and_vote_an_intent() -> None:
    memory = _memory()
    query = unit([[1, 0.02, 0]])[0]
    assert [h.entry.id for h in memory.similar(query, 2)] == [1, 2]
    assert [h.entry.id for h in memory.similar(query, 2, exclude_group="g1")] == [2, 3]  # never itself
    guess = memory.intent_of_message(query, k=3)
    assert guess is not None and guess.intent == "cancel_order" and 0.5 < guess.confidence <= 1.0
    memory.remove(1)
    assert [h.entry.id for h in memory.similar(query, 3)] == [2, 3]
    assert vote([]) is None


def test_a_message_with_many_copies_still_gets_k_neighbours_from_other_groups() -> None:
    memory = AnswerMemory(exact=True, ndim=3)
    copies = [Entry(i, "cancel", f"reply {i}", "cancel_order", group="cancel") for i in range(30)]
    others = [Entry(100 + i, f"other {i}", f"other reply {i}", "track_refund", group=f"o{i}") for i in range(3)]
    vecs = unit([[1, 0, 0]] * 30 + [[0.5, 0.5, 0], [0.4, 0.6, 0], [0.3, 0.7, 0]])
    memory.add(copies + others, vecs, vecs)
    hits = memory.similar(unit([[1, 0, 0]])[0], 3, exclude_group="cancel")
    assert [h.entry.id for h in hits] == [100, 101, 102]


def test_the_placeholder_contract() -> None:
    profile = Profile(custom_slots={"Order Number": "#42"})
    allowed = allowed_slots(profile, ["Visit {{Online Order Interaction}} to proceed."])
    assert outside_contract("Call {{Customer Support Phone Number}} about {{ order number }}.", allowed) == []
    assert outside_contract("See {{Online Order Interaction}} and {{Refund Policy}}", allowed) == \
        ["{{Refund Policy}}"]
    assert slots_in("a {{ Refund  Policy }} b") == {"refund policy": "{{ Refund  Policy }}"}


def test_grounded_prompts_carry_the_exemplars_and_keep_the_system_rules(tiny_causal: Path) -> None:  # noqa: F811
    from csra.specs import DEFAULT_INSTRUCTION
    from ml.prompting import conversation_prompt, example_prompt, grounded_system, system_message, truncate_tokens
    from models_store.loading import load_model_and_tokenizer

    tok = load_model_and_tokenizer(tiny_causal).tokenizer
    prompt = example_prompt(tok, DEFAULT_INSTRUCTION, "cancel my order", ["Answer one.", "Answer two."])
    assert "[1] Answer one." in prompt and "[2] Answer two." in prompt and prompt.index("[1]") < prompt.index("cancel")
    assert "[1]" not in example_prompt(tok, DEFAULT_INSTRUCTION, "cancel my order")
    long = " ".join(["word"] * 300)
    assert len(tok(truncate_tokens(tok, long, 20), add_special_tokens=False)["input_ids"]) <= 24
    system = grounded_system(system_message(DEFAULT_INSTRUCTION, "friendly", True), ["Exemplar."])
    turns = [{"role": "user", "content": f"question {i} " * 30} for i in range(6)]
    turns = [t for pair in zip(turns, [{"role": "assistant", "content": "answer " * 30}] * 6, strict=True)
             for t in pair][:-1]
    fitted = conversation_prompt(tok, system, turns, max_tokens=300)
    assert "warm, friendly tone" in fitted and "[1] Exemplar." in fitted  # the rules stay
    assert "question 5" in fitted and "question 0" not in fitted  # the oldest turns go first


def test_steering_floors_the_length_and_guides_by_the_exemplars(tiny_causal: Path) -> None:  # noqa: F811
    from models_store.loading import load_model_and_tokenizer

    tok = load_model_and_tokenizer(tiny_causal).tokenizer
    answer, other = " ".join(["word"] * 40), "Another approved answer."
    n = len(tok(answer, add_special_tokens=False)["input_ids"])

    def floor(share: float, max_new_tokens: int = 384) -> int:
        return steering(tok, Grounding(length_floor=share), [answer, other], max_new_tokens).min_new_tokens

    assert floor(0.5) == int(0.5 * n) > 0 and floor(1.5) == int(1.5 * n)  # of the nearest answer's length
    assert floor(1.0, 10) == 9  # below max_new_tokens: the reply can still end
    off = Grounding(copy_bias=0, no_repeat_ngram_size=0, length_floor=0)
    assert steering(tok, off, [answer], 384) == Steering()  # neither floor, copy bias nor loop guard
    assert steering(tok, None, [answer], 384) == Steering()  # an ungrounded model: nothing unless asked
    assert steering(tok, None, [answer], 384, no_repeat_ngram_size=12) == Steering(no_repeat_ngram_size=12)
    # without exemplars (the memory not built yet) a grounded model keeps its loop guard, nothing else
    guard = Grounding().no_repeat_ngram_size
    assert steering(tok, Grounding(length_floor=1), [], 384) == Steering(no_repeat_ngram_size=guard)
    assert steering(tok, Grounding(), [answer], 384, no_repeat_ngram_size=0).no_repeat_ngram_size == 0
    copy = steering(tok, Grounding(), [answer, other], 384)  # the default: a copy bias, the loop guard's guides
    assert copy.copy_bias == Grounding().copy_bias > 0 and copy.min_new_tokens == int(0.8 * n)
    assert copy.copy_guides == Grounding().copy_exemplars
    assert steering(tok, Grounding(copy_exemplars=2), [answer, other], 384).copy_guides == 2
    assert copy.guides == tuple(tuple(tok(x, add_special_tokens=False)["input_ids"]) for x in (answer, other))
    # a message like an approved one is held to its answer; one unlike any (an off-topic question) is not:
    # the loop guard and its guides stay, the floor and the copy bias go
    assert steering(tok, Grounding(), [answer, other], 384, similarity=0.9) == copy
    unlike = steering(tok, Grounding(), [answer, other], 384, similarity=Grounding().min_similarity - 0.01)
    assert unlike == Steering(guides=copy.guides, no_repeat_ngram_size=guard)
    assert steering(tok, Grounding(min_similarity=0), [answer, other], 384, similarity=0.1) == copy


def test_an_approved_answer_the_reply_follows_is_never_cut(tiny_causal: Path) -> None:  # noqa: F811
    from models_store.loading import load_model_and_tokenizer

    tok = load_model_and_tokenizer(tiny_causal).tokenizer
    answer, longer = " ".join(["word"] * 40), " ".join(["other"] * 60)
    n, m = (len(tok(x, add_special_tokens=False)["input_ids"]) for x in (answer, longer))
    # the copy bias follows the first exemplar: the limit makes room for all of it, and never shrinks
    assert steering(tok, Grounding(), [answer, longer], 10).max_new_tokens == n + ANSWER_ROOM
    assert steering(tok, Grounding(), [answer, longer], 500).max_new_tokens == 500
    assert steering(tok, Grounding(copy_exemplars=0), [answer, longer], 10).max_new_tokens == m + ANSWER_ROOM
    # nothing it follows: the caller's limit
    assert steering(tok, Grounding(copy_bias=0), [answer], 10).max_new_tokens == 10
    assert steering(tok, Grounding(), [answer], 10, similarity=0.1).max_new_tokens == 10
    assert steering(tok, None, [answer], 10).max_new_tokens == 10
    assert steering(tok, Grounding(), [], 10).max_new_tokens == 10


SHARED = "To cancel your order, sign in to your account, open Orders, choose the order and click Cancel order."
NEAREST_ODD = "Our team will be glad to help you with any issue regarding your purchase today."


def test_consensus_puts_the_answers_the_others_share_first() -> None:
    nearest = [NEAREST_ODD, SHARED + " We are here to help.", "Please contact us.", SHARED,
               SHARED.replace("click", "press")]
    order = by_consensus(nearest)
    assert sorted(order) == list(range(5)) and order[-1] in (0, 2)  # the outliers last
    assert set(order[:3]) == {1, 3, 4}
    assert by_consensus(nearest[:2]) == [0, 1] and by_consensus([]) == []  # nothing to vote with: nearest first


def hits(*answers: tuple[str, str]) -> list[Hit]:
    """Nearest first: (reply, intent) pairs as the memory would find them."""
    return [Hit(Entry(id=i, message=f"m{i}", reply=r, intent=intent), 1.0 - i / 100)
            for i, (r, intent) in enumerate(answers)]


def test_grounding_exemplars_are_the_nearest_or_the_consensus_of_a_pool() -> None:
    nearest = hits((NEAREST_ODD, "a"), ("Please contact us.", "a"), (SHARED, "a"),
                   (SHARED.replace("click", "press"), "a"), (SHARED + " Thanks!", "a"))
    assert grounding_exemplars(Grounding(k=2, consensus_pool=0), nearest) == nearest[:2]  # 0: the k nearest
    chosen = grounding_exemplars(Grounding(k=2, consensus_pool=5), nearest)
    assert len(chosen) == 2 and all(SHARED[:40] in h.entry.reply for h in chosen)
    below_k = grounding_exemplars(Grounding(k=3, consensus_pool=2), [nearest[2], nearest[0], nearest[3]])
    assert len(below_k) == 3 and below_k[-1] == nearest[0]  # a pool below k: the k nearest, in consensus order
    assert answers_needed(Grounding(k=3, consensus_pool=8)) == 8
    # training grounds each example on its k nearest: a model trained on them follows its first exemplar
    assert grounding_exemplars(training_grounding(Grounding(k=2, consensus_pool=5)), nearest) == nearest[:2]
    assert answers_needed(training_grounding(Grounding(k=3))) == 3
    assert answers_needed(Grounding(k=3, consensus_pool=0)) == 3
    assert answers_needed(None) == 0
    with pytest.raises(ValueError, match="consensus_pool"):
        Grounding(consensus_pool=9)


def test_the_nearest_answer_decides_the_intent_the_consensus_the_wording() -> None:
    """Five answers of another intent agree with each other; the nearest answer's intent still wins, and
    its own answers fill the prompt before any other intent's (nearest first) when there are fewer than k."""
    other = [(SHARED + f" Reference {i}.", "switch_account") for i in range(5)]
    nearest = hits(("Edit your profile under Settings, then save it.", "edit_account"), *other[:2],
                   ("To edit your account, open Settings and change the details.", "edit_account"), *other[2:])
    chosen = grounding_exemplars(Grounding(k=3, consensus_pool=8), nearest)
    assert [h.entry.intent for h in chosen] == ["edit_account", "edit_account", "switch_account"]
    assert chosen[2] == nearest[1]  # the nearest of the others fills the third place
    unknown = hits(*[(reply, "") for reply, _ in [(NEAREST_ODD, ""), *other]])  # no intents: the whole pool
    assert all(SHARED[:40] in h.entry.reply for h in grounding_exemplars(Grounding(k=3, consensus_pool=8), unknown))


@pytest.mark.parametrize("first,second", [("usearch.index", "onnxruntime"), ("onnxruntime", "usearch.index")])
def test_the_vector_index_and_onnx_runtime_load_in_either_order(first: str, second: str) -> None:
    """usearch 2.26.6 then onnxruntime 1.31 segfaulted the process: the pinned pair must not."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {first}; import {second}"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
