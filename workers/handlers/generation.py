"""Generation jobs: replies for chats, the Compare tab and the OpenAI-compatible endpoint.

The generate worker runs Celery's thread pool, so concurrent jobs live in one process and share
one ``BatchingEngine``: requests that arrive while a batch runs join it between decode steps, and
loaded models stay in a bounded LRU cache (never reloaded per request).

One path for every reply: the job's ``GenerateSpec`` holds the resolved model name and the whole
conversation; this handler renders it (dropping the oldest turns to fit, never the system rules),
streams text to the job's Redis stream (the one token channel: SSE clients and the UI read it)
and returns the result. The runner writes the outcome and the chat turn it answers in one
transaction and only then ends the stream (``db.jobs.finish``, ``csra.enqueue.after_jobs_ended``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.memory import MemoryNotBuilt, embedder, serving_memory
from csra.profile import Profile, fill_placeholders
from csra.redis_conn import get_redis
from csra.settings import get_settings
from csra.specs import DEFAULT_INSTRUCTION, RETRIEVAL, GenerateSpec, Grounding
from csra.streams import publish_start, publish_text
from db.models import Setting
from db.session import session_scope
from ml.memory.grounding import allowed_slots, outside_contract
from ml.memory.memory import INTENT_VOTERS, Hit, vote
from models_store.registry import find_model_row
from workers.presence import publish_invariance

if TYPE_CHECKING:
    from ml.inference.engine import BatchingEngine
    from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)

MEMORY_SHOWN = 3  # similar approved answers shown to the agent
CHECK_INTERVAL = 0.3  # how often a waiting job checks for cancel and its time limit
STOP_WAIT_SECONDS = 5.0
_lock = threading.Lock()
_engine: BatchingEngine | None = None


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

    ``stop()`` (the job was cancelled, lost or ran out of time) makes the engine drop the request
    at its next decode step; from then on nothing more is kept or published, so no token ever
    follows the stream's end marker.
    """

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.text = ""
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def on_text(self, delta: str) -> None:
        with self._lock:
            if self.stopped.is_set():
                return
            self.text += delta
            try:
                publish_text(get_redis(), self.job_id, delta)
            except (redis.RedisError, OSError):  # the stream is a convenience; the result still has the text
                logger.debug("stream publish failed", exc_info=True)

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()


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
    intent: str | None = None
    intent_confidence: float | None = None

    def similar(self, n: int = 3) -> list[dict[str, Any]]:
        return [{"entry_id": h.entry.id, "reply": h.entry.reply, "intent": h.entry.intent,
                 "similarity": round(h.similarity, 4)} for h in self.hits[:n]]


def memory_context(message: str, k: int) -> MemoryContext | None:
    """The approved answers to the ``k`` most similar messages and the intent they vote for
    (None while the memory is not built: replies then go on without it)."""
    try:
        memory = serving_memory().searchable()
        vector = embedder().embed([message])[0]
    except MemoryNotBuilt:
        return None
    hits = memory.similar(vector, max(k, MEMORY_SHOWN))
    guess = vote(hits[:INTENT_VOTERS])
    return MemoryContext(hits, guess.intent if guess else None, guess.confidence if guess else None)


def _prompt(loaded: LoadedModel, spec: GenerateSpec, grounding: Grounding | None,
            context: MemoryContext | None) -> str:
    from ml.inference.tokens import max_prompt_tokens
    from ml.prompting import conversation_prompt, grounded_system, system_message, truncate_tokens

    system = system_message(DEFAULT_INSTRUCTION, spec.tone, spec.ask_details_only_if_relevant)
    if grounding is not None and context is not None:
        exemplars = [truncate_tokens(loaded.tokenizer, h.entry.reply, grounding.max_exemplar_tokens)
                     for h in context.hits[: grounding.k]]
        system = grounded_system(system, exemplars, grounding.template)
    budget = max_prompt_tokens(loaded, spec.max_new_tokens)
    return conversation_prompt(loaded.tokenizer, system, spec.conversation(), budget)


def _retrieved(job_id: int, row: dict[str, Any], context: MemoryContext | None) -> dict[str, Any]:
    """The retrieval responder: the nearest approved answer, no model at all."""
    if context is None or not context.hits:
        raise JobError("the retrieval responder needs the answer memory: POST /memory/rebuild "
                       '{"dataset_id": N} builds it from a dataset\'s train split')
    best = context.hits[0]
    stream = _Stream(job_id)
    stream.on_text(best.entry.reply)
    return {"raw_text": best.entry.reply, "model": row["name"], "model_id": row["id"], "prompt_tokens": 0,
            "completion_tokens": 0, "latency_ms": 0.0, "first_token_ms": 0.0, "finish_reason": "retrieval",
            "batch_size": 1, "memory_entry_id": best.entry.id, "similarity": round(best.similarity, 4)}


def _generated(job_id: int, row: dict[str, Any], spec: GenerateSpec, ctx: JobContext,
               context: MemoryContext | None) -> dict[str, Any]:
    from ml.inference.types import GenerationRequest

    path = Path(row["path"])
    engine = batching_engine()
    ctx.progress(0.02, "loading the model")
    loaded = _wait(engine.load_async(str(path), _loader(path)), ctx)  # on the engine thread: see BatchingEngine
    publish_invariance(row["name"], loaded.invariance)
    grounding = Grounding.model_validate(row["grounding"]) if row.get("grounding") else None
    stream = _Stream(job_id)
    request = GenerationRequest(prompt=_prompt(loaded, spec, grounding, context), max_new_tokens=spec.max_new_tokens,
                                temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
                                on_text=stream.on_text, should_stop=stream.stopped.is_set)
    ctx.progress(0.05, "generating")
    try:
        res = _wait(engine.submit(str(path), _loader(path), request), ctx, stream)
    except JobCancelled:  # keep what the agent already saw
        raise JobCancelled(result={"text": stream.text, "raw_text": stream.text, "model": row["name"]}) from None
    return {"raw_text": res.text.strip(), "model": row["name"], "model_id": row["id"],
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "latency_ms": res.latency_ms, "first_token_ms": res.first_token_ms, "finish_reason": res.finish_reason,
            "batch_size": res.batch_size, "grounded": grounding is not None and context is not None,
            "batch_invariant": (loaded.invariance or {}).get("batch_invariant")}


def handle_generation(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    spec = GenerateSpec.model_validate(params)
    row = find_model_row(spec.model_id)
    if row is None:
        raise JobError(f"model {spec.model_id!r} no longer exists (deleted?); pick another model")
    with contextlib.suppress(redis.RedisError, OSError):
        publish_start(get_redis(), job_id, ctx.attempt)
    grounding_k = int((row.get("grounding") or {}).get("k", 0))
    context = memory_context(spec.conversation()[-1]["content"], grounding_k)
    if row.get("kind") == RETRIEVAL:
        result = _retrieved(job_id, row, context)
    else:
        result = _generated(job_id, row, spec, ctx, context)
    profile = load_profile()
    exemplars = [h.entry.reply for h in context.hits[: grounding_k or MEMORY_SHOWN]] if context else []
    result["text"] = fill_placeholders(result["raw_text"], profile)
    result["slot_warnings"] = outside_contract(result["raw_text"], allowed_slots(profile, exemplars))
    if context is not None:
        result.update(intent=context.intent, intent_confidence=context.intent_confidence,
                      similar=context.similar(MEMORY_SHOWN))
    return result
