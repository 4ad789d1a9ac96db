"""Batched generation: batch invariance, sampling, limits, streaming, model cache, batching engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from csra.specs import DEFAULT_INSTRUCTION
from ml.inference.batches import generate_batch, generate_many
from ml.inference.cache import ModelCache, model_bytes
from ml.inference.engine import BatchingEngine
from ml.inference.llamacpp_model import ReplyDecoder
from ml.inference.rows import make_rows, sample_rows
from ml.inference.selfcheck import prepare_model
from ml.inference.tokens import TextStream, stop_tokens
from ml.inference.types import GenerationRequest
from ml.prompting import example_prompt
from models_store.loading import LoadedModel, load_model_and_tokenizer
from tests.fixtures_models import tiny_causal, tiny_seq2seq  # noqa: F401

MESSAGES = [
    "I want to cancel my order",
    "How can I get a refund for my last purchase please",
    "reset password",
    "Can you help me change my shipping address as soon as possible",
    "delete my account",
    "hi",
    "I need help to track my order {{Order Number}} today",
    "speak to a human agent",
]


def lively(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """Re-draw the weights larger: a freshly initialised tiny model repeats one token forever."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return loaded


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest):
    """Tiny models gain nothing from threads, and on a busy machine every parallel op waits for a core."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def causal(tiny_causal: Path) -> LoadedModel:  # noqa: F811
    return lively(load_model_and_tokenizer(tiny_causal))


@pytest.fixture(scope="module")
def seq2seq(tiny_seq2seq: Path) -> LoadedModel:  # noqa: F811
    return lively(load_model_and_tokenizer(tiny_seq2seq))


def prompts(loaded: LoadedModel, n: int = len(MESSAGES)) -> list[str]:
    return [example_prompt(loaded.tokenizer, DEFAULT_INSTRUCTION, m) for m in MESSAGES[:n]]


def alone(loaded: LoadedModel, requests: list[GenerationRequest]) -> list:
    return [generate_batch(loaded, [r])[0] for r in requests]


# --------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_greedy_alone_equals_batch(arch: str, causal: LoadedModel, seq2seq: LoadedModel) -> None:
    loaded = causal if arch == "causal" else seq2seq
    requests = [GenerationRequest(p, max_new_tokens=16) for p in prompts(loaded)]
    single = alone(loaded, requests)
    batch = generate_batch(loaded, requests)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.text for r in batch] == [r.text for r in single]
    assert len({tuple(r.token_ids) for r in batch}) > 1  # the rows really differ
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in single]
    assert len(set(r.prompt_tokens for r in batch)) > 1  # and were padded


def test_generate_many_keeps_input_order(causal: LoadedModel) -> None:
    requests = [GenerationRequest(p, max_new_tokens=8) for p in prompts(causal, 7)]
    progress: list[tuple[int, int]] = []
    checks = []
    results = generate_many(causal, requests, batch_size=3, on_batch_done=lambda d, n: progress.append((d, n)),
                            check_cancelled=lambda: checks.append(1))
    assert [r.token_ids for r in results] == [r.token_ids for r in alone(causal, requests)]
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert len(checks) >= 3


def test_generate_many_cancellation_stops(causal: LoadedModel) -> None:
    class Cancelled(Exception):
        pass

    def cancel() -> None:
        raise Cancelled()

    with pytest.raises(Cancelled):
        generate_many(causal, [GenerationRequest(p, max_new_tokens=4) for p in prompts(causal, 3)],
                      check_cancelled=cancel)


def test_a_stopped_row_leaves_the_batch_at_the_next_step(causal: LoadedModel) -> None:
    p = prompts(causal, 3)
    stop = threading.Event()
    pieces: list[str] = []

    def on_text(delta: str) -> None:
        assert not stop.is_set(), "text streamed after the row was stopped"
        pieces.append(delta)
        if len(pieces) == 3:
            stop.set()

    long = GenerationRequest(p[0], 200, temperature=1.0, seed=3, on_text=on_text, should_stop=stop.is_set)
    others = [GenerationRequest(p[1], 12), GenerationRequest(p[2], 12)]
    results = generate_batch(causal, [long, *others])
    assert results[0].finish_reason == "cancelled"
    assert results[0].text == "".join(pieces) and len(pieces) == 3
    assert results[0].completion_tokens < 20  # it stopped decoding, not at max_new_tokens
    assert [r.token_ids for r in results[1:]] == [r.token_ids for r in alone(causal, others)]  # others unaffected


# --------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(causal: LoadedModel) -> None:
    prompt = prompts(causal, 1)[0]

    def sample(seed: int) -> str:
        return generate_batch(causal, [GenerationRequest(prompt, 16, temperature=1.0, seed=seed)])[0].text

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(1, 5)}) > 1


def test_each_row_keeps_its_own_settings(causal: LoadedModel) -> None:
    """A batch mixing greedy, sampled (two seeds, nucleus) and lengths: each row as if alone."""
    p = prompts(causal, 4)
    requests = [
        GenerationRequest(p[0], 10),
        GenerationRequest(p[1], 6, temperature=0.8, seed=3),
        GenerationRequest(p[2], 12, temperature=1.2, top_p=0.9, seed=4),
        GenerationRequest(p[1], 6, temperature=0.8, seed=5),
    ]
    batch = generate_batch(causal, requests)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone(causal, requests)]
    assert batch[1].token_ids != batch[3].token_ids  # same prompt, other seed


def test_top_p_keeps_only_the_nucleus(causal: LoadedModel) -> None:
    """top_p close to 0 keeps the most likely token only: sampling becomes greedy."""
    req = GenerationRequest(prompts(causal, 1)[0], 12)
    greedy = generate_batch(causal, [req])[0]
    nucleus = generate_batch(causal, [GenerationRequest(req.prompt, 12, temperature=1.0, top_p=1e-6, seed=9)])[0]
    assert nucleus.token_ids == greedy.token_ids


# --------------------------------------------------------------------------- limits and end tokens


def test_max_new_tokens_and_length_finish(causal: LoadedModel, seq2seq: LoadedModel) -> None:
    for loaded in (causal, seq2seq):
        p = prompts(loaded, 3)
        # min_new_tokens: a random model that writes an end (or turn) token early cannot end these rows
        results = generate_batch(loaded, [GenerationRequest(p[0], 3, min_new_tokens=3),
                                          GenerationRequest(p[1], 7, min_new_tokens=7),
                                          GenerationRequest(p[2], 1, min_new_tokens=1)])
        assert [r.completion_tokens for r in results] == [3, 7, 1]
        assert {r.finish_reason for r in results} == {"length"}
        assert all(r.latency_ms >= r.first_token_ms > 0 for r in results)


@pytest.mark.parametrize("marker", ["<|im_end|>", "<|im_start|>"])
def test_end_token_stops_a_row(tiny_causal: Path, marker: str) -> None:  # noqa: F811
    """The end of turn ends a reply, and so does the next turn's start: a model that skips its
    ``<|im_end|>`` and writes ``<|im_start|>user`` has finished, and the invented turn is not its text."""
    loaded = lively(load_model_and_tokenizer(tiny_causal))
    end = loaded.tokenizer.convert_tokens_to_ids(marker)
    assert end in stop_tokens(loaded).every
    assert end in ReplyDecoder.from_tokenizer(loaded.tokenizer).stops.every  # the llama.cpp engine's stops
    steps = {"n": 0}

    def end_after_three(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1  # the output layer runs once per step
        if steps["n"] > 3:
            logits = logits.clone()
            logits[..., end] = 1e4
        return logits

    prepare_model(loaded)  # its load-time self-check runs the output layer too: before counting steps
    loaded.model.get_output_embeddings().register_forward_hook(end_after_three)
    p = prompts(loaded, 2)
    results = generate_batch(loaded, [GenerationRequest(p[0], 20, on_text=lambda _: None), GenerationRequest(p[1], 2)])
    assert (results[0].finish_reason, results[0].completion_tokens, results[0].token_ids[-1]) == ("stop", 4, end)
    assert results[0].text == loaded.tokenizer.decode(results[0].token_ids[:3], skip_special_tokens=True).strip()
    assert (results[1].finish_reason, results[1].completion_tokens) == ("length", 2)


def test_min_new_tokens_masks_the_end_tokens_until_reached(tiny_causal: Path) -> None:  # noqa: F811
    loaded = lively(load_model_and_tokenizer(tiny_causal))
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def always_end(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., end] = 1e4  # every row would end at its first token
        return logits

    prepare_model(loaded)
    loaded.model.get_output_embeddings().register_forward_hook(always_end)
    p = prompts(loaded, 2)
    floor = GenerationRequest(p[0], 20, min_new_tokens=5)
    results = generate_batch(loaded, [floor, GenerationRequest(p[1], 20)])
    # the floored row cannot end before 5 tokens and ends at once after; its neighbour is not affected
    assert (results[0].finish_reason, results[0].completion_tokens) == ("stop", 6)
    assert end not in results[0].token_ids[:5] and results[0].token_ids[5] == end
    assert (results[1].finish_reason, results[1].completion_tokens) == ("stop", 1)
    assert generate_batch(loaded, [floor])[0].token_ids == results[0].token_ids  # alone as batched
    beams = generate_batch(loaded, [GenerationRequest(p[0], 20, min_new_tokens=5, num_beams=2)])[0]
    assert end not in beams.token_ids[:5] and beams.token_ids[5:] == [end]  # beam search keeps the floor too
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate_batch(loaded, [GenerationRequest(p[0], 4, min_new_tokens=-1)])


def test_a_copy_bias_follows_the_guide_to_its_end(causal: LoadedModel) -> None:
    end = causal.tokenizer.convert_tokens_to_ids("<|im_end|>")
    p = prompts(causal, 3)
    plain = alone(causal, [GenerationRequest(x, 12) for x in p])
    guide = tuple(causal.tokenizer("Your refund is on its way", add_special_tokens=False)["input_ids"])
    assert plain[0].token_ids[: len(guide)] != list(guide)
    copied = GenerationRequest(p[0], 40, guides=(guide,), copy_bias=1e3)
    unbiased = GenerationRequest(p[2], 12, guides=(guide,))
    results = generate_batch(causal, [copied, GenerationRequest(p[1], 12), unbiased])
    # a bias far above the logits writes the guide and ends where it ends; the other rows are untouched
    assert results[0].token_ids == [*guide, end] and results[0].finish_reason == "stop"
    assert [r.token_ids for r in results[1:]] == [r.token_ids for r in plain[1:]]  # no bias: no change
    assert generate_batch(causal, [copied])[0].token_ids == results[0].token_ids  # alone as batched
    beams = generate_batch(causal, [GenerationRequest(p[0], 40, num_beams=2, guides=(guide,), copy_bias=1e3)])
    assert beams[0].token_ids == [*guide, end]  # beam search follows it too
    other = tuple(causal.tokenizer("Please send us your order number", add_special_tokens=False)["input_ids"])
    for first, second in ((guide, other), (other, guide)):  # copy_guides 1: the first guide only
        only = GenerationRequest(p[0], 40, guides=(first, second), copy_bias=1e3, copy_guides=1)
        assert generate_batch(causal, [only])[0].token_ids == [*first, end]
    # a length floor past the guide's end does not push a reply on once it has written that end
    floored = GenerationRequest(p[0], 40, min_new_tokens=len(guide) + 10, guides=(guide,), copy_bias=1e3)
    assert generate_batch(causal, [floored])[0].token_ids == [*guide, end]
    assert generate_batch(causal, [GenerationRequest(p[0], 40, min_new_tokens=len(guide) + 10, num_beams=2,
                                                     guides=(guide,), copy_bias=1e3)])[0].token_ids == [*guide, end]
    with pytest.raises(ValueError, match="copy_bias"):
        generate_batch(causal, [GenerationRequest(p[0], 4, guides=(guide,), copy_bias=-1.0)])
    with pytest.raises(ValueError, match="copy_guides"):
        generate_batch(causal, [GenerationRequest(p[0], 4, guides=(guide,), copy_bias=1.0, copy_guides=-1)])


def test_the_loop_guard_bans_the_token_that_would_repeat_a_run(causal: LoadedModel) -> None:
    """Through ``Row.steer``, the step both engines and beam search take: the model's favourite token is
    banned when it would repeat a 3-token run, unless an approved answer (a guide) repeats that run too."""
    p = prompts(causal, 1)[0]
    vocab = causal.model.get_output_embeddings().weight.shape[0]

    def next_token(request: GenerationRequest, reply: list[int]) -> int:
        row = make_rows(causal, [request], None, 0.0)[0]
        row.generated = list(reply)
        logits = torch.zeros(1, vocab)
        logits[0, 7], logits[0, 9] = 5.0, 1.0  # the model wants 7
        return sample_rows([row], logits)[0]

    reply = [5, 6, 7, 8, 5, 6]
    assert next_token(GenerationRequest(p, 10), reply) == 7  # unguarded: 5 6 7 again
    assert next_token(GenerationRequest(p, 10, no_repeat_ngram_size=3), reply) == 9
    assert next_token(GenerationRequest(p, 10, no_repeat_ngram_size=4), reply) == 7  # 6 7 8 5 6 7 is no 4-run repeat
    repeats = GenerationRequest(p, 10, no_repeat_ngram_size=3, guides=((5, 6, 7, 1, 5, 6, 7),), copy_bias=0.5)
    assert next_token(repeats, reply) == 7  # its approved answer repeats 5 6 7 itself
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generate_batch(causal, [GenerationRequest(p, 4, no_repeat_ngram_size=1)])
    beams = generate_batch(causal, [GenerationRequest(p, 30, num_beams=2, no_repeat_ngram_size=2)])[0].token_ids
    assert len({tuple(beams[i:i + 2]) for i in range(len(beams) - 1)}) == len(beams) - 1


def test_beam_search_request(causal: LoadedModel) -> None:
    p = prompts(causal, 2)
    results = generate_batch(causal, [GenerationRequest(p[0], 6, num_beams=2), GenerationRequest(p[1], 6)])
    assert results[0].completion_tokens <= 6 and results[0].finish_reason in ("stop", "length")
    assert results[0].first_token_ms is None
    assert results[1].token_ids == generate_batch(causal, [GenerationRequest(p[1], 6)])[0].token_ids


# --------------------------------------------------------------------------- streaming


def test_streamed_deltas_add_up_to_the_text(causal: LoadedModel, seq2seq: LoadedModel) -> None:
    for loaded in (causal, seq2seq):
        pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
        requests = [GenerationRequest(p, 24, temperature=t, seed=1, on_text=pieces[i].append)
                    for i, (p, t) in enumerate(zip(prompts(loaded, 3), (0.0, 1.0, 0.7), strict=True))]
        results = generate_batch(loaded, requests)
        for i, r in enumerate(results):
            assert "".join(pieces[i]) == r.text
            assert all(pieces[i])  # no empty deltas
        assert any(len(p) > 1 for p in pieces.values())  # streamed, not one piece at the end


def test_text_stream_holds_back_partial_characters(causal: LoadedModel) -> None:
    tok = causal.tokenizer
    ids = tok("  Café ☕ — déjà vu  ", add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    stream = TextStream(tok, pieces.append)
    for n in range(1, len(ids) + 1):
        stream.push(ids[:n])
        assert not "".join(pieces).endswith("\ufffd")
    final = stream.finish(ids)
    assert final == "Café ☕ — déjà vu" == "".join(pieces)


def test_a_failing_callback_does_not_fail_the_batch(causal: LoadedModel) -> None:
    def broken(_: str) -> None:
        raise RuntimeError("client went away")

    p = prompts(causal, 2)
    results = generate_batch(causal, [GenerationRequest(p[0], 8, min_new_tokens=8, on_text=broken),
                                      GenerationRequest(p[1], 8, min_new_tokens=8)])
    assert [r.completion_tokens for r in results] == [8, 8]


# --------------------------------------------------------------------------- model cache


def test_model_cache_lru_by_count(causal: LoadedModel, seq2seq: LoadedModel) -> None:
    calls: list[str] = []

    def loader(key: str, model: LoadedModel):
        return lambda: calls.append(key) or model

    cache = ModelCache(max_models=2)
    assert cache.get("a", loader("a", causal)) is causal
    cache.get("b", loader("b", seq2seq))
    assert cache.get("a", loader("a", causal)) is causal  # hit: no reload, "a" is now the most recent
    cache.get("c", loader("c", seq2seq))  # evicts "b", the least recently used
    assert calls == ["a", "b", "c"]
    assert cache.keys() == ["a", "c"]
    stats = cache.stats
    assert (stats["hits"], stats["loads"], stats["evictions"], stats["models"]) == (1, 3, 1, 2)
    assert cache.evict("a") and not cache.evict("a")
    assert "a" not in cache


def test_model_cache_lru_by_bytes(causal: LoadedModel, seq2seq: LoadedModel) -> None:
    size = model_bytes(causal)
    assert size > 0
    cache = ModelCache(max_models=10, max_bytes=int(size * 1.5))
    cache.get("a", lambda: causal)
    cache.get("b", lambda: causal)  # a second copy would exceed the budget: "a" goes
    assert cache.keys() == ["b"]
    assert cache.stats["bytes"] == size


def test_model_cache_loads_once_under_concurrency(causal: LoadedModel) -> None:
    calls = []

    def slow_loader() -> LoadedModel:
        calls.append(1)
        time.sleep(0.2)
        return causal

    cache = ModelCache()
    got: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", slow_loader))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(g is causal for g in got) and len(got) == 4


# --------------------------------------------------------------------------- batching engine


@pytest.mark.parametrize("continuous", [True, False])
def test_engine_batches_requests_that_arrive_while_a_batch_runs(causal: LoadedModel, continuous: bool) -> None:
    p = prompts(causal)
    release, started = threading.Event(), threading.Event()

    def hold(_: str) -> None:  # the first request blocks the engine thread mid-batch
        started.set()
        release.wait(10)

    blocker = GenerationRequest(p[0], 6, temperature=1.0, seed=1, on_text=hold)
    requests = [GenerationRequest(p[i % len(p)], 4 + i) for i in range(8)]
    cache = ModelCache()
    with BatchingEngine(cache=cache, max_batch_size=8, max_wait_ms=50, continuous=continuous) as engine:
        first = engine.submit("tiny", lambda: causal, blocker)
        assert started.wait(10), "the blocking request never streamed"
        futures: list = [None] * 8

        def submit(i: int) -> None:
            futures[i] = engine.submit("tiny", lambda: causal, requests[i])

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        release.set()
        results = [f.result(timeout=30) for f in futures]
        first.result(timeout=30)
    stats = engine.stats  # read once the engine stopped: futures resolve before their batch ends
    assert stats["requests"] == 9
    if continuous:  # they joined the blocker's running batch between two decode steps
        assert stats["joined"] >= 7 and stats["batches"] <= 2, stats
    else:  # they waited for the next batch and ran as one
        assert stats["joined"] == 0 and stats["batch_sizes"].get(8) == 1, stats
    assert cache.stats["loads"] == 1
    assert [r.token_ids for r in results] == [r.token_ids for r in alone(causal, requests)]
    assert all(r.latency_ms >= r.first_token_ms for r in results)


def test_engine_does_not_let_one_model_starve_another(causal: LoadedModel) -> None:
    p = prompts(causal)
    release, started = threading.Event(), threading.Event()

    def hold(_: str) -> None:
        started.set()
        release.wait(10)

    with BatchingEngine(max_batch_size=8, max_wait_ms=20) as engine:
        first = engine.submit("a", lambda: causal, GenerationRequest(p[0], 6, temperature=1.0, seed=1, on_text=hold))
        assert started.wait(10), "the blocking request never streamed"
        other = engine.submit("b", lambda: causal, GenerationRequest(p[1], 4))
        more = engine.submit("a", lambda: causal, GenerationRequest(p[2], 4))
        release.set()
        for f in (first, other, more):
            f.result(timeout=30)
    stats = engine.stats
    assert stats["joined"] == 0 and stats["batches"] == 3, stats  # "b" waited, so nothing joined "a"


def test_engine_stops_a_cancelled_request_and_reports_invariance(causal: LoadedModel) -> None:
    stop = threading.Event()
    seen: list[str] = []

    def on_text(delta: str) -> None:
        seen.append(delta)
        stop.set()  # the caller cancels after the first piece of text

    with BatchingEngine(max_wait_ms=1) as engine:
        loaded = engine.load("tiny", lambda: causal)
        assert loaded.invariance is not None and loaded.invariance["batch_invariant"], loaded.invariance
        future = engine.submit("tiny", lambda: causal, GenerationRequest(prompts(causal, 1)[0], 2000, temperature=1.0,
                                                                         seed=1, on_text=on_text,
                                                                         should_stop=stop.is_set))
        result = future.result(timeout=30)
    assert result.finish_reason == "cancelled" and result.completion_tokens <= 3 and len(seen) == 1


def test_engine_fails_the_futures_of_a_failing_batch() -> None:
    def broken_loader() -> LoadedModel:
        raise OSError("weights missing")

    with BatchingEngine(max_wait_ms=1) as engine:
        future = engine.submit("x", broken_loader, GenerationRequest("hi"))
        with pytest.raises(OSError, match="weights missing"):
            future.result(timeout=10)
    with pytest.raises(RuntimeError):
        engine.submit("x", broken_loader, GenerationRequest("hi"))


def test_engine_loads_models_on_its_own_thread(causal: LoadedModel) -> None:
    threads: list[str] = []

    def loader() -> LoadedModel:
        threads.append(threading.current_thread().name)
        return causal

    def broken() -> LoadedModel:
        raise OSError("weights missing")

    with BatchingEngine(max_wait_ms=1) as engine:
        assert engine.load("tiny", loader) is causal
        assert engine.load("tiny", loader) is causal  # cached: not loaded again
        with pytest.raises(OSError, match="weights missing"):
            engine.load("broken", broken)
    assert threads == ["csra-batching-engine"]


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def smollm2(smollm2_folder: Path) -> LoadedModel:
    return load_model_and_tokenizer(smollm2_folder)


@pytest.mark.slow
def test_smollm2_greedy_alone_equals_batch(smollm2: LoadedModel) -> None:
    messages = ["I want to cancel my order", "how do I get a refund for a damaged item",
                "i cant log into my account, can u help", "Where is my package? It's late"]
    requests = [GenerationRequest(example_prompt(smollm2.tokenizer, DEFAULT_INSTRUCTION, m), max_new_tokens=24)
                for m in messages]
    batch = generate_batch(smollm2, requests)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone(smollm2, requests)]
    assert all(r.text for r in batch)


def _threads() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Threads:")))


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_engine_thread_ends_when_idle_and_its_openmp_team_with_it(causal: LoadedModel) -> None:
    """libgomp keeps a team of threads per thread that ran torch, for that thread's life; the llama.cpp
    engine of the same process decodes slower while it lives (``ml.inference.owner_thread``). This runs
    on the machine's libgomp: if it kept the team after the thread ended, the count would show it."""
    loads = []

    def loader() -> LoadedModel:
        loads.append(1)
        return causal

    torch.set_num_threads(2)  # a team of 2: one OpenMP thread besides the engine's (one_thread restores it)
    before = _threads()
    with BatchingEngine(max_wait_ms=1, idle_exit_seconds=1.0) as engine:
        first = engine.submit("tiny", loader, GenerationRequest(prompts(causal, 1)[0], max_new_tokens=4)).result(60)
        assert _threads() >= before + 2  # the engine thread and its OpenMP thread
        _until(lambda: not engine._thread.alive)
        _until(lambda: _threads() <= before)
        again = engine.submit("tiny", loader, GenerationRequest(prompts(causal, 1)[0], max_new_tokens=4)).result(60)
        assert again.token_ids == first.token_ids
        assert engine._thread.starts == 2 and loads == [1]  # a new thread, the model still cached
