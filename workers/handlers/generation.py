"""Generation jobs: replies for chats, the Compare tab and the OpenAI-compatible endpoint.

The generate worker runs Celery's thread pool, so concurrent jobs live in one process and
share one ``BatchingEngine``: requests that arrive while a batch runs join it between decode steps,
and loaded models stay in a bounded LRU cache (never reloaded per request).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import update

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.profile import Profile, fill_placeholders
from csra.settings import get_settings
from csra.specs import DEFAULT_INSTRUCTION, GenerateSpec
from csra.streams import publish_end, publish_start, publish_text
from db.base import utcnow
from db.models import ChatMessage, ChatSession, Job, Setting
from db.session import session_scope
from workers.handlers.models import find_model_row
from workers.presence import publish_invariance
from workers.runner import LostClaim

logger = logging.getLogger(__name__)

PARTIAL_WRITE_INTERVAL = 0.3
STOP_WAIT_SECONDS = 5.0
_lock = threading.Lock()
_engine: Any = None
_redis: redis.Redis | None = None


def batching_engine() -> Any:
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


def redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(get_settings().effective_redis_url, socket_timeout=5)
    return _redis


def load_profile() -> Profile:
    with session_scope() as s:
        row = s.get(Setting, "profile")
        return Profile.model_validate(row.value if row else {})


def _messages(spec: GenerateSpec) -> tuple[str, list[dict[str, str]]]:
    """(the last user message, the history before it)."""
    if spec.messages is None:
        return spec.message or "", []
    *history, last = [m for m in spec.messages if m["role"] != "system"]
    return last["content"], history


def _loader(path: Path) -> Any:
    def load() -> Any:
        from models_store.loading import load_model_and_tokenizer

        return load_model_and_tokenizer(path)

    return load


class _Partial:
    """Collects streamed text; the engine thread appends, the job thread writes it to the row.

    ``stop()`` (the job was cancelled, lost or ran out of time) makes the engine drop the request
    at its next decode step; from that moment on nothing more is appended or published, so no
    token ever follows the stream's end marker.
    """

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.text = ""
        self.first_at: float | None = None
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def on_text(self, delta: str) -> None:
        with self._lock:
            if self.stopped.is_set():
                return
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.text += delta
            try:
                publish_text(redis_client(), self.job_id, delta)
            except (redis.RedisError, OSError):  # the stream is a convenience; the row still gets the text
                logger.debug("stream publish failed", exc_info=True)

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()


def _write_partial(job_id: int, text: str) -> None:
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                  .values(result={"partial_text": text}, stage="generating"))


def _wait(future: Future[Any], ctx: JobContext, partial: _Partial | None = None) -> Any:
    """The future's result, checking for cancel (and the time limit) and saving partial text meanwhile.

    A job that stops waiting (cancelled, lost its claim, past its time limit) stops its row too:
    the engine drops it at its next decode step. A model still loading finishes loading (and stays
    cached) in the engine; the job does not wait for it.
    """
    written = ""
    while True:
        try:
            return future.result(timeout=PARTIAL_WRITE_INTERVAL)
        except FutureTimeout:
            try:
                ctx.check_cancelled()
            except BaseException:
                if partial is not None:
                    partial.stop()
                    with contextlib.suppress(Exception):
                        future.result(timeout=STOP_WAIT_SECONDS)  # the row leaves the batch at its next step
                raise
            if partial is not None and partial.text != written:
                written = partial.text
                _write_partial(partial.job_id, written)


def generate(job_id: int, spec: GenerateSpec, ctx: JobContext) -> dict[str, Any]:
    from ml.inference.types import GenerationRequest
    from ml.prompting import build_messages, render_prompt, system_message

    row = find_model_row(spec.model_id)
    if row is None:
        raise JobError(f"model {spec.model_id!r} no longer exists (deleted?); pick another model")
    path = Path(row["path"])
    try:
        publish_start(redis_client(), job_id, ctx.attempt)
    except (redis.RedisError, OSError):
        logger.debug("stream start publish failed", exc_info=True)
    eng = batching_engine()
    ctx.progress(0.02, "loading the model")
    loaded = _wait(eng.load_async(str(path), _loader(path)), ctx)  # on the engine thread: see BatchingEngine
    publish_invariance(row["name"], loaded.invariance)
    user, history = _messages(spec)
    system = system_message(DEFAULT_INSTRUCTION, spec.tone, spec.ask_details_only_if_relevant)
    prompt = render_prompt(loaded.tokenizer, build_messages(system, user, history))
    partial = _Partial(job_id)
    request = GenerationRequest(prompt=prompt, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                top_p=spec.top_p, seed=spec.seed, on_text=partial.on_text,
                                should_stop=partial.stopped.is_set)
    ctx.progress(0.05, "waiting for a batch")
    res = _wait(eng.submit(str(path), _loader(path), request), ctx, partial)
    raw = res.text.strip()
    return {
        "text": fill_placeholders(raw, load_profile()), "raw_text": raw, "model": row["name"],
        "model_id": row["id"], "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
        "latency_ms": res.latency_ms, "first_token_ms": res.first_token_ms, "finish_reason": res.finish_reason,
        "batch_invariant": (loaded.invariance or {}).get("batch_invariant"),
    }


def _finish_chat_message(message_id: int, result: dict[str, Any] | None, status: str, error: str | None) -> None:
    """The assistant turn of a chat: filled in on success, marked failed or cancelled (never missing)."""
    with session_scope() as s:
        msg = s.get(ChatMessage, message_id)
        if msg is None:
            return
        if result is not None:
            msg.content, msg.raw_content = result["text"], result["raw_text"]
            msg.status, msg.model_name = "done", result["model"]
            msg.latency_ms, msg.prompt_tokens = result["latency_ms"], result["prompt_tokens"]
            msg.completion_tokens = result["completion_tokens"]
        else:
            msg.status, msg.error = ("cancelled" if status == "cancelled" else "failed"), error
        chat = s.get(ChatSession, msg.chat_id)
        if chat is not None:
            chat.updated_at = utcnow()


def handle_generate(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    message_id = params.get("assistant_message_id")
    spec = GenerateSpec.model_validate({k: v for k, v in params.items() if k != "assistant_message_id"})
    try:
        result = generate(job_id, spec, ctx)
    except LostClaim:  # another runner owns the job now: its chat turn is not ours to write
        raise
    except JobCancelled:
        _end(job_id, message_id, None, "cancelled", "generation cancelled")
        raise
    except JobError as e:
        _end(job_id, message_id, None, "failed", str(e))
        raise
    except Exception as e:
        _end(job_id, message_id, None, "failed", f"generation failed: {type(e).__name__}: {e}")
        raise
    _end(job_id, message_id, result, "succeeded", None)
    return result


def _end(job_id: int, message_id: int | None, result: dict[str, Any] | None, status: str,
         error: str | None) -> None:
    if message_id is not None:
        _finish_chat_message(int(message_id), result, status, error)
    try:
        publish_end(redis_client(), job_id, status, error)
    except (redis.RedisError, OSError):
        logger.debug("stream end publish failed", exc_info=True)
