"""The llama.cpp engine (``ml.inference.llamacpp``) on the tiny Llama exported to GGUF at f16.

Real llama.cpp (llama-cpp-python), real GGUF export, csra's tokenizer: nothing is mocked. Skips
without ``llama_cpp``.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

from csra.specs import DEFAULT_INSTRUCTION
from ml.export import export_gguf
from ml.inference.batches import generate_batch
from ml.inference.llamacpp import LlamaCppEngine, LlamaCppLoadError, ReplyDecoder
from ml.inference.tokens import StopTokens, encode_prompt
from ml.inference.types import GenerationRequest, GenerationResult
from ml.prompting import example_prompt
from models_store.loading import LoadedModel, load_model_and_tokenizer, load_tokenizer
from tests.fixtures_models import tiny_causal  # noqa: F401

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no llama.cpp engine")

MESSAGES = (
    "I want to cancel my order {{Order Number}}",
    "How can I get a refund for my last purchase",
    "I need help to reset my password",
    "Can you help me track my order today",
    "I want to cancel my order as soon as possible",
    "How can I get a refund please",
    "Can you help me track my order {{Order Number}}",
    "I need help to reset my password for my last purchase",
)
TIMEOUT = 60


@pytest.fixture(scope="module")
def sharp(tiny_causal: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny Llama with its weights (norms aside) times 8, rounded to f16.

    The tiny model's random weights (std 0.02) give nearly flat logits that hardly depend on the
    prompt: every prompt's greedy reply is one whitespace token repeated, which would make the
    comparisons below meaningless. Sharpened, the 8 prompts give 8 different replies with real text;
    rounded to f16, the GGUF holds exactly the torch weights. Measured on it: llama.cpp's greedy ids
    equal torch's for at least the first 22 tokens of all 8 prompts (then f16 activations in
    llama.cpp's matmuls flip a near-tie for one prompt), so the comparison takes 16.
    """
    loaded = load_model_and_tokenizer(tiny_causal)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "norm" not in name:
                param.mul_(8)
            param.copy_(param.half().float())
    folder = tmp_path_factory.mktemp("sharp") / "tiny-sharp"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(sharp: Path) -> LoadedModel:
    return load_model_and_tokenizer(sharp)


@pytest.fixture(scope="module")
def gguf(sharp: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(sharp, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16").path


@pytest.fixture(scope="module")
def decoder(tiny: LoadedModel) -> ReplyDecoder:
    return ReplyDecoder.from_loaded(tiny)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    with LlamaCppEngine(n_threads=1, max_batch_size=16, n_ctx=4096) as eng:
        yield eng


def _prompt(tiny: LoadedModel, message: str) -> tuple[str, list[int]]:
    prompt = example_prompt(tiny.tokenizer, DEFAULT_INSTRUCTION, message)
    return prompt, encode_prompt(tiny, prompt)


def _submit(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel, decoder: ReplyDecoder, message: str,
            **settings: Any) -> Future[GenerationResult]:
    prompt, ids = _prompt(tiny, message)
    return engine.submit(gguf, ids, GenerationRequest(prompt, **settings), decoder)


def _alone(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel, decoder: ReplyDecoder, message: str,
           **settings: Any) -> GenerationResult:
    return _submit(engine, gguf, tiny, decoder, message, **settings).result(TIMEOUT)


def test_greedy_replies_equal_the_torch_engines(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                               decoder: ReplyDecoder) -> None:
    replies = set()
    for message in MESSAGES:
        prompt, ids = _prompt(tiny, message)
        expected = generate_batch(tiny, [GenerationRequest(prompt, max_new_tokens=16)])[0]
        got = _alone(engine, gguf, tiny, decoder, message, max_new_tokens=16)
        assert got.token_ids == expected.token_ids
        assert (got.text, got.finish_reason, got.completion_tokens, got.prompt_tokens) == (
            expected.text, expected.finish_reason, expected.completion_tokens, expected.prompt_tokens)
        assert got.prompt_tokens == len(ids) and got.batch_size == 1
        assert 0 < got.first_token_ms <= got.latency_ms  # type: ignore[operator]
        replies.add(got.text)
    assert len(replies) == len(MESSAGES) and all(replies)  # the prompts matter: a real comparison


def test_the_decoder_without_torch_weights_has_the_same_stop_ids(sharp: Path, decoder: ReplyDecoder) -> None:
    tokenizer, arch = load_tokenizer(sharp)
    assert ReplyDecoder.from_tokenizer(tokenizer, arch).stops == decoder.stops


def test_concurrent_requests_batch_together_and_reply_as_alone(engine: LlamaCppEngine, gguf: Path,
                                                               tiny: LoadedModel, decoder: ReplyDecoder) -> None:
    alone = [_alone(engine, gguf, tiny, decoder, m, max_new_tokens=12) for m in MESSAGES]
    steps_before = dict(engine.stats()["step_sizes"])
    futures = [_submit(engine, gguf, tiny, decoder, m, max_new_tokens=12) for m in MESSAGES]
    together = [f.result(TIMEOUT) for f in futures]
    # greedy ids do not depend on the batch here (see the module docstring of ml.inference.llamacpp)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert max(r.batch_size for r in together) > 1
    stats = engine.stats()
    assert any(size > 1 and n > steps_before.get(size, 0) for size, n in stats["step_sizes"].items())
    assert stats["running"] == 0 and stats["queued"] == 0


def test_a_request_joins_a_running_batch(gguf: Path, tiny: LoadedModel, decoder: ReplyDecoder) -> None:
    """A request that arrives mid-reply joins the running batch (copying its prompt's start from the
    running sequence), and both replies are those of an engine that computes every prompt alone and in
    full. A fresh engine each: in the module's engine the prefix cache holds earlier tests' replies,
    whose cells sit elsewhere in the cache, so attention sums in another order and a near-tie can flip
    a greedy token (CI saw token 8 of 12 differ, about one run in five)."""
    asked: list[int] = []
    running, queued = threading.Event(), threading.Event()

    def should_stop() -> bool:  # asked on the engine thread before every step: hold the 3rd until the 2nd is queued
        asked.append(1)
        if len(asked) == 3:
            running.set()
            queued.wait(TIMEOUT)
        return False

    with LlamaCppEngine(n_threads=1, max_batch_size=16, n_ctx=4096) as engine:
        first = _submit(engine, gguf, tiny, decoder, MESSAGES[0], max_new_tokens=12, should_stop=should_stop)
        assert running.wait(TIMEOUT)
        second = _submit(engine, gguf, tiny, decoder, MESSAGES[1], max_new_tokens=4)
        queued.set()
        a, b = first.result(TIMEOUT), second.result(TIMEOUT)
        stats = engine.stats()
        assert (a.batch_size, b.batch_size) == (2, 2) and stats["joined"] == 1
        assert stats["prompt_tokens_computed"] < stats["prompt_tokens"]  # the start was copied, not computed
    with LlamaCppEngine(n_threads=1, n_ctx=4096, prefix_cache=False) as full:
        assert a.token_ids == _alone(full, gguf, tiny, decoder, MESSAGES[0], max_new_tokens=12).token_ids
        assert b.token_ids == _alone(full, gguf, tiny, decoder, MESSAGES[1], max_new_tokens=4).token_ids


def test_streamed_pieces_add_up_to_the_text(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                           decoder: ReplyDecoder) -> None:
    pieces: list[str] = []
    res = _alone(engine, gguf, tiny, decoder, MESSAGES[3], max_new_tokens=24, on_text=pieces.append)
    assert res.text and "".join(pieces) == res.text and len(pieces) > 1
    assert res.text == res.text.strip()


def test_max_new_tokens_ends_with_length(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                        decoder: ReplyDecoder) -> None:
    res = _alone(engine, gguf, tiny, decoder, MESSAGES[2], max_new_tokens=3)
    assert (res.finish_reason, res.completion_tokens, len(res.token_ids)) == ("length", 3, 3)


def test_min_new_tokens_masks_the_end_tokens_until_reached(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                                           decoder: ReplyDecoder) -> None:
    first = _alone(engine, gguf, tiny, decoder, MESSAGES[3], max_new_tokens=8).token_ids
    # a decoder for which the reply's greedy first token ends it: without a floor the reply ends there
    ending = ReplyDecoder(decoder.tokenizer, StopTokens(frozenset({first[0]})))
    prompt, ids = _prompt(tiny, MESSAGES[3])
    plain = engine.submit(gguf, ids, GenerationRequest(prompt, max_new_tokens=8), ending).result(TIMEOUT)
    assert (plain.finish_reason, plain.token_ids) == ("stop", first[:1])
    floored = engine.submit(gguf, ids, GenerationRequest(prompt, max_new_tokens=8, min_new_tokens=4),
                            ending).result(TIMEOUT)
    assert len(floored.token_ids) >= 4 and first[0] not in floored.token_ids[:4]
    with pytest.raises(ValueError, match="min_new_tokens"):
        _alone(engine, gguf, tiny, decoder, MESSAGES[3], max_new_tokens=8, min_new_tokens=-1)


def test_a_copy_bias_follows_the_guide_to_its_end(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                                  decoder: ReplyDecoder) -> None:
    guide = tuple(tiny.tokenizer("Your refund is on its way", add_special_tokens=False)["input_ids"])
    end = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt, ids = _prompt(tiny, MESSAGES[1])
    request = GenerationRequest(prompt, max_new_tokens=40, guides=(guide,), copy_bias=1e3)
    copied = engine.submit(gguf, ids, request, decoder).result(TIMEOUT)
    assert copied.token_ids == [*guide, end] and copied.finish_reason == "stop"
    # the same rule as csra's engine (Row.steer): the same tokens
    assert generate_batch(tiny, [request])[0].token_ids == copied.token_ids
    with pytest.raises(ValueError, match="copy_bias"):
        _alone(engine, gguf, tiny, decoder, MESSAGES[1], max_new_tokens=8, guides=(guide,), copy_bias=-1.0)


def test_should_stop_cancels_mid_reply(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                      decoder: ReplyDecoder) -> None:
    pieces: list[str] = []
    asked: list[int] = []

    def should_stop() -> bool:  # asked before every decode step: stop before the 5th
        asked.append(1)
        return len(asked) >= 5

    res = _alone(engine, gguf, tiny, decoder, MESSAGES[3], max_new_tokens=200, on_text=pieces.append,
                 should_stop=should_stop)
    assert (res.finish_reason, res.completion_tokens) == ("cancelled", 4)
    assert res.text == "".join(pieces) and res.text
    full = _alone(engine, gguf, tiny, decoder, MESSAGES[3], max_new_tokens=200)
    assert full.token_ids[:4] == res.token_ids and full.text.startswith(res.text)


def test_seeded_sampling_is_reproducible_alone(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                                          decoder: ReplyDecoder) -> None:
    settings: dict[str, Any] = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9}
    with LlamaCppEngine(n_threads=1, n_ctx=4096, prefix_cache=False) as exact:  # CSRA_GEN_LLAMACPP_PREFIX_CACHE
        first = _alone(exact, gguf, tiny, decoder, MESSAGES[0], seed=7, **settings)
        again = _alone(exact, gguf, tiny, decoder, MESSAGES[0], seed=7, **settings)
    assert again.token_ids == first.token_ids
    # with the prefix cache a prompt's cells come from earlier replies, in other cache cells: attention
    # then sums in another order, and a sampled token can flip (seen in CI) -- no reproducibility claimed
    cached = [_alone(engine, gguf, tiny, decoder, MESSAGES[0], seed=7, **settings).token_ids]
    futures = [_submit(engine, gguf, tiny, decoder, m, max_new_tokens=16) for m in MESSAGES[1:6]]
    batched = _submit(engine, gguf, tiny, decoder, MESSAGES[0], seed=7, **settings).result(TIMEOUT)
    for f in futures:
        f.result(TIMEOUT)
    # in a batch llama.cpp's logits can differ in the last bits from a lone run (no batch invariance by
    # construction), which can flip a sampled token: only that it samples there too is checked
    assert batched.completion_tokens > 0 and batched.finish_reason in ("stop", "length")
    others = [_alone(engine, gguf, tiny, decoder, MESSAGES[0], seed=s, **settings).token_ids for s in (8, 9, 10)]
    others.append(cached[0])
    assert any(ids != first.token_ids for ids in others)  # the seed matters
    greedy = _alone(engine, gguf, tiny, decoder, MESSAGES[0], max_new_tokens=16).token_ids
    assert any(ids != greedy for ids in [first.token_ids, *others])  # it does sample


def test_a_corrupt_gguf_fails_readably_and_the_engine_keeps_serving(engine: LlamaCppEngine, gguf: Path,
                                                                   tiny: LoadedModel, decoder: ReplyDecoder,
                                                                   tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    for bad in (corrupt, truncated, tmp_path / "missing.gguf"):
        with pytest.raises(LlamaCppLoadError, match=str(bad)) as info:
            _alone(engine, gguf=bad, tiny=tiny, decoder=decoder, message=MESSAGES[0], max_new_tokens=4)
        assert len(str(info.value)) > len(str(bad)) + 30  # a reason, not just the path
        with pytest.raises(LlamaCppLoadError, match=str(bad)):
            engine.load_async(bad).result(TIMEOUT)
    res = _alone(engine, gguf, tiny, decoder, MESSAGES[0], max_new_tokens=4)
    assert res.completion_tokens >= 1


def test_invalid_requests_are_clear_value_errors(engine: LlamaCppEngine, gguf: Path, tiny: LoadedModel,
                                                decoder: ReplyDecoder) -> None:
    prompt, ids = _prompt(tiny, MESSAGES[0])
    with pytest.raises(ValueError, match="beam search .*not supported"):
        engine.submit(gguf, ids, GenerationRequest(prompt, num_beams=2), decoder)
    info = engine.load(gguf)
    long_ids = (ids * (info.n_ctx_seq // len(ids) + 1))[: info.n_ctx_seq]
    with pytest.raises(ValueError, match=f"{len(long_ids)} tokens: it does not fit the context of {info.n_ctx_seq}"):
        engine.submit(gguf, long_ids, GenerationRequest(prompt), decoder).result(TIMEOUT)
    # a prompt that fits, with a reply longer than the context leaves: cut at the context
    near = long_ids[: info.n_ctx_seq - 3]
    res = engine.submit(gguf, near, GenerationRequest(prompt, max_new_tokens=50), decoder).result(TIMEOUT)
    assert res.completion_tokens <= 3


def test_at_most_max_models_stay_loaded(gguf: Path, tiny: LoadedModel, decoder: ReplyDecoder,
                                       tmp_path: Path) -> None:
    copies = [tmp_path / f"copy-{i}.gguf" for i in range(3)]
    for c in copies:
        shutil.copyfile(gguf, c)
    prompt, ids = _prompt(tiny, MESSAGES[1])
    with LlamaCppEngine(n_threads=1, max_batch_size=4, n_ctx=1024, max_models=2) as eng:
        results = [eng.submit(c, ids, GenerationRequest(prompt, max_new_tokens=4), decoder) for c in copies]
        assert len({tuple(f.result(TIMEOUT).token_ids) for f in results}) == 1
        assert eng.stats()["models"] == [str(copies[1].resolve()), str(copies[2].resolve())]
        eng.submit(copies[1], ids, GenerationRequest(prompt, max_new_tokens=2), decoder).result(TIMEOUT)
        eng.load(copies[0])  # the least recently used one (copy 2) goes
        assert eng.stats()["models"] == [str(copies[1].resolve()), str(copies[0].resolve())]
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="not running"):
        eng.submit(gguf, ids, GenerationRequest(prompt), decoder)
    assert time.perf_counter() - started < 1


def test_stop_fails_running_and_queued_requests(gguf: Path, tiny: LoadedModel, decoder: ReplyDecoder) -> None:
    running = threading.Event()

    def slow() -> bool:  # 10 ms per step: the 400-token reply takes 4 s, stop() comes long before
        running.set()
        time.sleep(0.01)
        return False

    prompt, ids = _prompt(tiny, MESSAGES[2])
    eng = LlamaCppEngine(n_threads=1, max_batch_size=1, n_ctx=1024).start()
    first = eng.submit(gguf, ids, GenerationRequest(prompt, max_new_tokens=400, should_stop=slow), decoder)
    queued = eng.submit(gguf, ids, GenerationRequest(prompt, max_new_tokens=4), decoder)  # no free slot: waits
    assert running.wait(TIMEOUT)
    eng.stop()
    for f in (first, queued):
        with pytest.raises(RuntimeError, match="engine stopped"):
            f.result(TIMEOUT)


def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_engine_thread_ends_when_idle_and_the_model_stays_loaded(gguf: Path, tiny: LoadedModel,
                                                                     decoder: ReplyDecoder) -> None:
    """Its OpenMP team would slow the torch engine of the same process (``ml.inference.owner_thread``)."""
    with LlamaCppEngine(n_threads=1, n_ctx=4096, idle_exit_seconds=0.1) as eng:
        first = _alone(eng, gguf, tiny, decoder, MESSAGES[0], max_new_tokens=8)
        _until(lambda: not eng._thread.alive)
        assert eng.stats()["models"] == [str(gguf.resolve())]  # still loaded: no reload for the next chat
        again = _alone(eng, gguf, tiny, decoder, MESSAGES[0], max_new_tokens=8)
        assert again.token_ids == first.token_ids and eng._thread.starts == 2
        _until(lambda: not eng._thread.alive)
    assert eng.stats()["models"] == []  # stop() with no thread running freed the models itself
    with pytest.raises(RuntimeError, match="not running"):
        _submit(eng, gguf, tiny, decoder, MESSAGES[0])


def test_a_prompt_start_that_was_computed_is_shared_not_computed_again(gguf: Path, tiny: LoadedModel,
                                                                         decoder: ReplyDecoder) -> None:
    """The system prompt that every chat starts with (and, in a conversation, its earlier turns) is
    computed once: concurrent prompts share it within one step, later ones copy it from the prefix
    cache. Greedy replies stay those of an engine that computes every prompt in full."""
    with LlamaCppEngine(n_threads=1, n_ctx=4096, prefix_cache=False) as full:
        expected = [_alone(full, gguf, tiny, decoder, m, max_new_tokens=12) for m in MESSAGES]
        assert full.stats()["prompt_tokens_computed"] == full.stats()["prompt_tokens"]
    prompts = [_prompt(tiny, m)[1] for m in MESSAGES]
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert common > 10  # the system prompt and the chat template's start

    with LlamaCppEngine(n_threads=1, n_ctx=4096) as eng:
        together = [_submit(eng, gguf, tiny, decoder, m, max_new_tokens=12) for m in MESSAGES]
        got = [f.result(TIMEOUT) for f in together]
        stats = eng.stats()
        assert stats["prompt_tokens"] == sum(map(len, prompts))
        # the first step computed the common start once (the requests may join over two steps)
        assert stats["prompt_tokens_computed"] <= stats["prompt_tokens"] - (len(MESSAGES) - 2) * common
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]

        before = eng.stats()["prompt_tokens_computed"]
        alone = _alone(eng, gguf, tiny, decoder, MESSAGES[2], max_new_tokens=12)
        assert eng.stats()["prompt_tokens_computed"] - before <= len(prompts[2]) - common
        assert alone.token_ids == expected[2].token_ids

        # the next turn of that conversation: its prompt starts with the last prompt and reply, all cached
        turn = prompts[2] + alone.token_ids + prompts[3][common:]
        before = eng.stats()["prompt_tokens_computed"]
        nxt = eng.submit(gguf, turn, GenerationRequest("next turn", max_new_tokens=4), decoder).result(TIMEOUT)
        assert eng.stats()["prompt_tokens_computed"] - before <= len(turn) - len(prompts[2]) - len(alone.token_ids) + 1
        with LlamaCppEngine(n_threads=1, n_ctx=4096, prefix_cache=False) as full:
            assert full.submit(gguf, turn, GenerationRequest("next turn", max_new_tokens=4), decoder
                               ).result(TIMEOUT).token_ids == nxt.token_ids
