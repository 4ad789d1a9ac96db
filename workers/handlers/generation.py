"""Generation jobs: replies for chats, the Compare tab and the OpenAI-compatible endpoint.

The generate worker runs Celery's thread pool, so concurrent jobs live in one process and share
one ``BatchingEngine``: requests that arrive while a batch runs join it between decode steps, and
loaded models stay in a bounded LRU cache (never reloaded per request). A model with a GGUF export
can be served by llama.cpp instead (``backend``; ``auto`` does where an export exists): one
``LlamaCppEngine`` per process, concurrent chats decoding together as parallel sequences of one
context. Prompts are rendered and tokenized by csra's tokenizer on both paths, so tone, privacy,
grounding, placeholders and streaming behave the same.

One path for every reply: the job's ``GenerateSpec`` holds the resolved model name and the whole
conversation; this handler renders it (dropping the oldest turns to fit, never the system rules),
streams text to the job's Redis stream (the one token channel: SSE clients and the UI read it)
and returns the result. The runner writes the outcome and the chat turn it answers in one
transaction and only then ends the stream (``db.jobs.finish``, ``csra.enqueue.after_jobs_ended``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.memory import MemoryNotBuilt, embedder, serving_memory
from csra.profile import Profile, fill_placeholders
from csra.redis_conn import get_redis
from csra.settings import get_settings
from csra.specs import DEFAULT_INSTRUCTION, RETRIEVAL, GenerateSpec, Grounding, recorded_grounding
from csra.streams import publish_start
from db.models import Setting
from db.session import session_scope
from ml.inference.llamacpp_build import native_bf16, unusable_reason
from ml.memory.grounding import (
    Steering,
    allowed_slots,
    answers_needed,
    choose_answers,
    follows_approved,
    grounding_exemplars,
    outside_contract,
    steering,
)
from ml.memory.memory import INTENT_VOTERS, Hit, vote
from models_store.naming import preferred_gguf
from models_store.registry import fetch_exports, find_model_row
from models_store.remote import ModelHashMismatch, ModelStoreError
from workers.presence import publish_invariance
from workers.stream_publisher import Piece, publisher

if TYPE_CHECKING:
    from ml.inference.engine import BatchingEngine
    from ml.inference.llamacpp import LlamaCppEngine, ReplyDecoder
    from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)

MEMORY_SHOWN = 3  # similar approved answers shown to the agent
CHECK_INTERVAL = 0.3  # how often a waiting job checks for cancel and its time limit
STOP_WAIT_SECONDS = 5.0
_lock = threading.Lock()
_engine: BatchingEngine | None = None
_llama_engine: LlamaCppEngine | None = None


def batching_engine() -> BatchingEngine:
    """The process-wide batching engine and its model cache (created on first use)."""
    global _engine
    with _lock:
        if _engine is None:
            from ml.cpu_share import InteractiveSignal
            from ml.inference.cache import ModelCache
            from ml.inference.engine import BatchingEngine

            s = get_settings()
            cache = ModelCache(max_models=s.gen_cache_models, max_bytes=int(s.gen_cache_mb * (1 << 20)))
            signal = InteractiveSignal(s.interactive_signal_path)  # training on this machine pauses meanwhile
            _engine = BatchingEngine(cache=cache, max_batch_size=s.gen_max_batch, max_wait_ms=s.gen_max_wait_ms,
                                     on_busy=signal.touch)
            _engine.start()
        return _engine


def llamacpp_engine() -> LlamaCppEngine:
    """The process-wide llama.cpp engine (created on first use): continuous batching over one context per model."""
    global _llama_engine
    with _lock:
        if _llama_engine is None:
            from ml.cpu_share import InteractiveSignal
            from ml.inference.llamacpp import LlamaCppEngine

            s = get_settings()
            signal = InteractiveSignal(s.interactive_signal_path)
            _llama_engine = LlamaCppEngine(n_threads=s.gen_llamacpp_threads, max_batch_size=s.gen_max_batch,
                                           max_models=s.gen_cache_models, on_busy=signal.touch,
                                           prefix_cache=s.gen_llamacpp_prefix_cache)
            _llama_engine.start()
        return _llama_engine


def serving_order(preference: list[str]) -> list[str]:
    """``CSRA_GEN_GGUF_PREFERENCE`` as this worker applies it: bf16 only where llama.cpp multiplies it with
    the CPU's bf16 dot products (elsewhere it is slower than f16 and less exact)."""
    return [q for q in preference if q != "bf16" or native_bf16()]


def choose_backend(spec: GenerateSpec, row: dict[str, Any]) -> tuple[str, Path | None]:
    """``("torch", None)`` or ``("llamacpp", the GGUF export to serve)`` for this request and model."""
    s = get_settings()
    asked = s.gen_backend if spec.backend == "auto" else spec.backend
    if asked == "torch":
        return "torch", None
    quant = asked.partition(":")[2]
    try:  # exports published from other hosts (a shared model store)
        fetch_exports(row["name"], row.get("content_hash"), Path(row["path"]))
    except (ModelStoreError, ModelHashMismatch):
        if asked != "auto":
            raise  # llama.cpp was asked for: an unreachable store retries the job, a corrupt export fails it
        logger.warning("the model store's exports of %s cannot be fetched: serving it with what this host has",
                       row["name"], exc_info=True)
    gguf = preferred_gguf(Path(row["path"]), [quant] if quant else serving_order(s.gen_gguf_preference))
    if gguf is None:
        if asked == "auto":
            return "torch", None
        raise JobError(f"model {row['name']!r} has no GGUF export{' at ' + quant if quant else ''} for llama.cpp to "
                       f"serve: POST /models/{row['name']}/export (or csra models export {row['name']}) makes one; "
                       "or ask for backend torch")
    unusable = unusable_reason()
    if unusable is None:
        return "llamacpp", gguf
    if asked == "auto":
        logger.warning("serving %s through torch, not its GGUF export: %s", row["name"], unusable)
        return "torch", None
    raise JobError(f"backend llamacpp cannot run on this generate worker: {unusable}; ask for backend torch meanwhile")


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: str) -> tuple[Any, str, ReplyDecoder]:
    """A model's tokenizer, architecture and stop rules, without its weights (llama.cpp holds those)."""
    from ml.inference.llamacpp import ReplyDecoder
    from models_store.loading import load_tokenizer

    tokenizer, arch = load_tokenizer(folder)
    return tokenizer, arch, ReplyDecoder.from_tokenizer(tokenizer, arch)


def load_profile() -> Profile:
    with session_scope() as s:
        row = s.get(Setting, "profile")
        return Profile.model_validate(row.value if row else {})


def _loader(path: Path) -> Any:
    def load() -> LoadedModel:
        from models_store.loading import load_model_and_tokenizer

        return load_model_and_tokenizer(path)

    return load


class _Stream:
    """The reply's text as it is decoded: kept here and published to the job's Redis stream.

    The first piece is published at once (time to first token); later pieces are held and published
    together at most every ``CSRA_GEN_STREAM_EVERY_MS``, and ``flush()`` publishes what is held when the
    reply is done. Why: each published piece wakes Redis, the API's SSE relay and the client, and on
    a 2-core machine those wake-ups take turns with the decode threads (a 64-token reply streamed
    piece by piece took about 25% longer than the same reply decoded in-process; bench/generate.py
    --backends). 25 updates a second still reads as live typing. When many replies stream at once,
    they share ``CSRA_GEN_STREAM_UPDATES_PER_SECOND``: each publishes at most every (replies streaming
    now / that many) seconds, so 16 chats at once do not wake the relay 16 times as often as one.

    ``stop()`` (the job was cancelled, lost or ran out of time) makes the engine drop the request
    at its next decode step; from then on nothing more is kept or published, so no token ever
    follows the stream's end marker.
    """

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.text = ""
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._held = ""
        self._sent_at: float | None = None
        settings = get_settings()
        self._every = settings.gen_stream_every_ms / 1000
        self._per_second = settings.gen_stream_updates_per_second

    def on_text(self, delta: str) -> None:
        with self._lock:
            if self.stopped.is_set():
                return
            self.text += delta
            self._held += delta
            now = time.monotonic()
            interval = self._interval(now)  # counts this reply as streaming from its first piece
            if self._sent_at is None or now - self._sent_at >= interval:
                self._publish(now)

    def _interval(self, now: float) -> float:
        """The least time between two of this reply's pieces: the setting's, or this reply's share of
        the worker's updates per second when many replies stream at once."""
        streaming = publisher().streaming(self.job_id, now) if self._per_second else 1
        return self._every if streaming == 1 else max(self._every, streaming / self._per_second)

    def flush(self) -> None:
        """Publish what is held and wait until it is sent (the reply is complete; before the job's end marker)."""
        with self._lock:
            if not self.stopped.is_set():
                self._publish(time.monotonic())
        publisher().ended(self.job_id)
        publisher().sync()

    def _publish(self, now: float) -> None:
        """Queue the held text for ``workers.stream_publisher`` (the engine thread does not wait on Redis)."""
        if not self._held:
            return
        delta, self._held, self._sent_at = self._held, "", now
        publisher().send(Piece(self.job_id, delta))

    def stop(self) -> None:
        """Nothing more is published, and what was queued is sent before this returns, so no piece can
        follow the end marker the runner writes next."""
        with self._lock:
            self.stopped.set()
        publisher().ended(self.job_id)
        publisher().sync()


def _wait(future: Future[Any], ctx: JobContext, stream: _Stream | None = None) -> Any:
    """The future's result, checking for cancel (and the time limit) meanwhile.

    A job that stops waiting (cancelled, lost its claim, past its time limit) stops its row too:
    the engine drops it at its next decode step. A model still loading finishes loading (and stays
    cached) in the engine; the job does not wait for it.
    """
    while True:
        try:
            return future.result(timeout=CHECK_INTERVAL)
        except FutureTimeout:
            try:
                ctx.check_cancelled()
            except BaseException:
                if stream is not None:
                    stream.stop()
                    with contextlib.suppress(Exception):
                        future.result(timeout=STOP_WAIT_SECONDS)  # the row leaves the batch at its next step
                raise


@dataclass
class MemoryContext:
    """What the answer memory says about the customer's last message."""

    hits: list[Hit]
    exemplars: list[Hit]  # a grounded model's prompt exemplars; otherwise the nearest answers the agent sees
    intent: str | None = None
    intent_confidence: float | None = None

    def replies(self) -> list[str]:
        return [h.entry.reply for h in self.exemplars]

    def nearest_similarity(self) -> float | None:
        """How similar the customer's message is to the nearest approved one (None: the memory is empty)."""
        return self.hits[0].similarity if self.hits else None

    def similar(self, n: int = 3, grounded_on: Collection[int] = ()) -> list[dict[str, Any]]:
        """What the agent sees: the ``n`` nearest approved answers and those a grounded reply's prompt
        carried (``grounded_on``: consensus can pick some beyond the ``n`` nearest), nearest first, each
        marked ``grounded`` when the reply stood on it."""
        shown = self.hits[:n] + [h for h in self.hits[n:] if h.entry.id in grounded_on]
        return [{"entry_id": h.entry.id, "reply": h.entry.reply, "intent": h.entry.intent,
                 "similarity": round(h.similarity, 4), "grounded": h.entry.id in grounded_on} for h in shown]


def memory_context(message: str, grounding: Grounding | None, at_least: int = 0) -> MemoryContext | None:
    """The approved answers to the most similar messages (those the grounding chooses its exemplars
    from, ``at_least`` as many as a consensus responder chooses from, and those the agent sees) and the
    intent they vote for (None while the memory is not built: replies then go on without it)."""
    try:
        memory = serving_memory().searchable()
        vector = embedder().embed([message])[0]
    except MemoryNotBuilt:
        return None
    hits = memory.similar(vector, max(answers_needed(grounding), MEMORY_SHOWN, at_least))
    exemplars = grounding_exemplars(grounding, hits) if grounding else hits[:MEMORY_SHOWN]
    guess = vote(hits[:INTENT_VOTERS])
    return MemoryContext(hits, exemplars, guess.intent if guess else None, guess.confidence if guess else None)


def _prompt(tokenizer: Any, budget: int | None, spec: GenerateSpec, grounding: Grounding | None,
            context: MemoryContext | None) -> str:
    """The rendered prompt (system rules, tone, grounding exemplars, the conversation cut to ``budget``
    tokens): the same on both backends."""
    from ml.prompting import conversation_prompt, grounded_system, system_message, truncate_tokens

    system = system_message(DEFAULT_INSTRUCTION, spec.tone, spec.ask_details_only_if_relevant)
    if grounding is not None and context is not None:
        exemplars = [truncate_tokens(tokenizer, x, grounding.max_exemplar_tokens) for x in context.replies()]
        system = grounded_system(system, exemplars, grounding.template)
    return conversation_prompt(tokenizer, system, spec.conversation(), budget)


def _steering(tokenizer: Any, spec: GenerateSpec, grounding: Grounding | None, context: MemoryContext | None
              ) -> Steering:
    """The reply's limit and loop guard, and a grounded reply's length floor and copy guides from the
    exemplars its prompt shows (not when even the nearest of them answers a message unlike this one)."""
    return steering(tokenizer, grounding, context.replies() if grounding and context else [], spec.max_new_tokens,
                    spec.no_repeat_ngram_size, context.nearest_similarity() if context else None)


def _retrieved(job_id: int, row: dict[str, Any], context: MemoryContext | None) -> dict[str, Any]:
    """A retrieval responder: the nearest approved answer (or the one the nearest agree on), no model."""
    if context is None or not context.hits:
        raise JobError(f"the {row['name']} responder needs the answer memory: POST /memory/rebuild "
                       '{"dataset_id": N} builds it from a dataset\'s train split')
    best = choose_answers(context.hits, 1, row.get("consensus_pool") or 0)[0]
    stream = _Stream(job_id)
    stream.on_text(best.entry.reply)
    stream.flush()
    return {"raw_text": best.entry.reply, "model": row["name"], "model_id": row["id"], "prompt_tokens": 0,
            "completion_tokens": 0, "latency_ms": 0.0, "first_token_ms": 0.0, "finish_reason": "retrieval",
            "batch_size": 1, "memory_entry_id": best.entry.id, "similarity": round(best.similarity, 4),
            "grounded_on": [best.entry.id]}  # the agent sees it marked among the similar answers


def _generated(job_id: int, row: dict[str, Any], spec: GenerateSpec, ctx: JobContext, grounding: Grounding | None,
               context: MemoryContext | None) -> dict[str, Any]:
    from ml.inference.tokens import max_prompt_tokens
    from ml.inference.types import GenerationRequest

    backend, gguf = choose_backend(spec, row)
    if gguf is not None:
        return _generated_llamacpp(job_id, row, spec, ctx, grounding, context, gguf)
    path = Path(row["path"])
    engine = batching_engine()
    ctx.progress(0.02, "loading the model")
    loaded = _wait(engine.load_async(str(path), _loader(path)), ctx)  # on the engine thread: see BatchingEngine
    publish_invariance(row["name"], loaded.invariance)
    stream = _Stream(job_id)
    steer = _steering(loaded.tokenizer, spec, grounding, context)
    prompt = _prompt(loaded.tokenizer, max_prompt_tokens(loaded, steer.max_new_tokens), spec, grounding, context)
    request = GenerationRequest(prompt=prompt, **asdict(steer), temperature=spec.temperature, top_p=spec.top_p,
                                seed=spec.seed, on_text=stream.on_text, should_stop=stream.stopped.is_set)
    ctx.progress(0.05, "generating")
    res = _finish_wait(engine.submit(str(path), _loader(path), request), ctx, stream, row)
    return {**_reply(row, res, grounding, context), "backend": backend,
            "batch_invariant": (loaded.invariance or {}).get("batch_invariant")}


def _finish_wait(future: Future[Any], ctx: JobContext, stream: _Stream, row: dict[str, Any]) -> Any:
    try:
        result = _wait(future, ctx, stream)
        stream.flush()
        return result
    except JobCancelled:  # keep what the agent already saw
        raise JobCancelled(result={"text": stream.text, "raw_text": stream.text, "model": row["name"]}) from None


def _reply(row: dict[str, Any], res: Any, grounding: Grounding | None, context: MemoryContext | None
           ) -> dict[str, Any]:
    return {"raw_text": res.text.strip(), "model": row["name"], "model_id": row["id"],
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "latency_ms": res.latency_ms, "first_token_ms": res.first_token_ms, "finish_reason": res.finish_reason,
            "batch_size": res.batch_size, "grounded": grounding is not None and context is not None,
            # the memory entries whose answers the prompt carried, in its order
            "grounded_on": [h.entry.id for h in context.exemplars] if grounding and context else [],
            # whether the copy bias and the length floor held it to them (not for a message unlike any approved;
            # None: the reply was not grounded)
            "follows_approved": (follows_approved(grounding, context.nearest_similarity())
                                 if grounding and context and context.exemplars else None)}


def _generated_llamacpp(job_id: int, row: dict[str, Any], spec: GenerateSpec, ctx: JobContext,
                        grounding: Grounding | None, context: MemoryContext | None, gguf: Path) -> dict[str, Any]:
    """The reply through llama.cpp from the model's GGUF export; a file llama.cpp cannot load fails this
    job with llama.cpp's reason (the torch backend keeps serving the model)."""
    from ml.inference.llamacpp import LlamaCppLoadError
    from ml.inference.tokens import encode_prompt_with, prompt_budget
    from ml.inference.types import GenerationRequest

    engine = llamacpp_engine()
    ctx.progress(0.02, "loading the model (llama.cpp)")
    try:
        info = _wait(engine.load_async(str(gguf)), ctx)
    except LlamaCppLoadError as e:
        raise JobError(f"llama.cpp could not load {gguf.name} ({e}); re-export the model, or ask for backend "
                       "torch") from None
    tokenizer, arch, decoder = _tokenizer(row["path"])
    stream = _Stream(job_id)
    steer = _steering(tokenizer, spec, grounding, context)
    prompt = _prompt(tokenizer, prompt_budget(info.n_ctx_seq, steer.max_new_tokens), spec, grounding, context)
    request = GenerationRequest(prompt=prompt, **asdict(steer), temperature=spec.temperature, top_p=spec.top_p,
                                seed=spec.seed, on_text=stream.on_text, should_stop=stream.stopped.is_set)
    ctx.progress(0.05, "generating")
    ids = encode_prompt_with(tokenizer, arch, prompt)
    res = _finish_wait(engine.submit(str(gguf), ids, request, decoder), ctx, stream, row)
    quant = gguf.stem.rsplit("-", 1)[-1]
    return {**_reply(row, res, grounding, context), "backend": f"llamacpp:{quant}", "batch_invariant": None}


def handle_generation(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    spec = GenerateSpec.model_validate(params)
    row = find_model_row(spec.model_id)
    if row is None:
        raise JobError(f"model {spec.model_id!r} no longer exists (deleted?); pick another model")
    with contextlib.suppress(redis.RedisError, OSError):
        publish_start(get_redis(), job_id, ctx.attempt)
    grounding = recorded_grounding(row.get("grounding"), copy_bias=spec.copy_bias)
    context = memory_context(spec.conversation()[-1]["content"], grounding, row.get("consensus_pool") or 0)
    if row.get("kind") == RETRIEVAL:
        result = _retrieved(job_id, row, context)
    else:
        result = _generated(job_id, row, spec, ctx, grounding, context)
    profile = load_profile()
    result["text"] = fill_placeholders(result["raw_text"], profile)
    result["slot_warnings"] = outside_contract(result["raw_text"],
                                               allowed_slots(profile, context.replies() if context else []))
    if context is not None:
        result.update(intent=context.intent, intent_confidence=context.intent_confidence,
                      similar=context.similar(MEMORY_SHOWN, set(result.get("grounded_on") or ())))
    return result
