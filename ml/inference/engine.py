"""One background thread that owns the model calls and batches concurrent requests per model."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from ml.inference.batches import run_rows
from ml.inference.cache import ModelCache
from ml.inference.decode import Joiner
from ml.inference.owner_thread import IDLE_EXIT_SECONDS, OwnerThread
from ml.inference.rows import Row, make_rows
from ml.inference.selfcheck import prepared
from ml.inference.types import GenerationRequest, GenerationResult, Loader
from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: GenerationRequest
    loader: Loader
    future: Future[GenerationResult]
    submitted: float
    seq: int


class BatchingEngine:
    """One background thread that owns the model calls and batches concurrent requests per model.

    ``submit`` queues a request and returns a future. The thread takes the model whose oldest
    request waited longest, waits for more requests of that model until ``max_batch_size`` are
    queued or its oldest request has waited ``max_wait_ms``, and runs them as one batch. With
    ``continuous`` (causal models, no beam search), requests that arrive meanwhile join the running
    batch between two decode steps, up to ``max_batch_size`` rows; each finished row answers its
    caller at once. Otherwise they wait for the next batch. Each request keeps its own sampling
    settings.
    A failing batch (or model load) fails the futures of that batch with the error.
    Latencies in results count from ``submit`` (queueing included).

    All torch work of the process should run on this one thread (``load`` runs model loading
    here too): libgomp throttles its spin-waiting once a process has more OpenMP threads than
    CPUs, and every other thread that runs a torch op starts its own OpenMP team. Measured on
    the 2-core project machine: decoding on a second thread after the main thread had loaded
    the model took 5.0 s instead of 4.0 s per 48-token reply. For the same reason the thread
    ends after ``idle_exit_seconds`` without work and its OpenMP team with it, so that the
    llama.cpp engine of the same process decodes at full speed (``ml.inference.owner_thread``).
    """

    def __init__(self, cache: ModelCache | None = None, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                 continuous: bool = True, on_busy: Callable[[], None] | None = None,
                 idle_exit_seconds: float = IDLE_EXIT_SECONDS) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.cache = cache if cache is not None else ModelCache()
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.continuous = continuous
        # called at every submit, load and decode step: background jobs on this machine pause meanwhile
        self.on_busy = on_busy or (lambda: None)
        self.joined = 0
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Pending]] = {}
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._seq = 0
        self._thread = OwnerThread("csra-batching-engine", self._loop, idle_exit_seconds)
        self._running = False
        self.batches_run = 0
        self.requests_served = 0
        self.batch_sizes: Counter[int] = Counter()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BatchingEngine:
        """Accept requests (idempotent); the engine thread starts with the first one."""
        with self._cond:
            self._running = True
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the running batch, fail the queued requests, stop the thread."""
        with self._cond:
            if not self._running:
                return
            self._running = False
            pending = [p.future for q in self._queues.values() for p in q] + [f for _, f in self._calls]
            self._queues.clear()
            self._calls.clear()
            self._cond.notify_all()
        for f in pending:
            if not f.done():
                f.set_exception(RuntimeError("the batching engine stopped"))
        self._thread.join(timeout)

    def __enter__(self) -> BatchingEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests

    def submit(self, model_key: str, loader: Loader, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue ``request`` for the model ``model_key`` (loaded through the cache with ``loader``)."""
        future: Future[GenerationResult] = Future()
        self.on_busy()
        with self._cond:
            if not self._running:
                raise RuntimeError("the batching engine is not running (call start())")
            self._seq += 1
            self._queues.setdefault(model_key, deque()).append(
                _Pending(request, loader, future, time.perf_counter(), self._seq))
            self._thread.wake()
            self._cond.notify_all()
        return future

    def load(self, model_key: str, loader: Loader) -> LoadedModel:
        """The model for ``model_key`` from the cache; a miss is loaded on the engine thread."""
        return self.load_async(model_key, loader).result()

    def load_async(self, model_key: str, loader: Loader) -> Future[LoadedModel]:
        """``load`` as a future, so that a caller can stop waiting (a cancelled job) while it loads."""
        self.on_busy()
        future: Future[LoadedModel] = Future()
        if model_key in self.cache:
            future.set_result(self.cache.get(model_key, loader))
            return future
        with self._cond:
            if not self._running:
                raise RuntimeError("the batching engine is not running (call start())")
            self._calls.append((lambda: self.cache.get(model_key, prepared(loader, self.max_batch_size)), future))
            self._thread.wake()
            self._cond.notify_all()
        return future

    @property
    def stats(self) -> dict[str, Any]:
        """Batches run, requests served, batch-size histogram, requests queued now."""
        with self._cond:
            return {"batches": self.batches_run, "requests": self.requests_served, "joined": self.joined,
                    "batch_sizes": dict(sorted(self.batch_sizes.items())),
                    "queued": sum(len(q) for q in self._queues.values())}

    # ------------------------------------------------------------------ the engine thread

    def _oldest_key(self) -> str | None:
        heads = [(q[0].seq, key) for key, q in self._queues.items() if q]
        return heapq.nsmallest(1, heads)[0][1] if heads else None

    def _next_batch(self) -> tuple[str, list[_Pending]] | tuple[Callable[[], Any], Future[Any]] | None:
        """Block until a call (a model load) or a batch is ready (None when stopping or idle); take it."""
        with self._cond:
            while True:
                if not self._running:
                    self._thread.ending()
                    return None
                if self._calls:
                    return self._calls.popleft()
                key = self._oldest_key()
                if key is None:
                    idle = not self._cond.wait(self._thread.idle_seconds)
                    if idle and self._running and not self._calls and self._oldest_key() is None:
                        self._thread.ending()  # the thread ends (submit starts another)
                        return None
                    continue
                queue = self._queues[key]
                deadline = queue[0].submitted + self.max_wait_ms / 1000
                remaining = deadline - time.perf_counter()
                if len(queue) >= self.max_batch_size or remaining <= 0:
                    batch = [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
                    if not queue:
                        del self._queues[key]
                    return key, batch
                self._cond.wait(remaining)

    def _loop(self) -> None:
        while True:
            item = self._next_batch()
            if item is None:
                return
            if callable(item[0]):
                fn, done = item
                if done.set_running_or_notify_cancel():
                    try:
                        done.set_result(fn())
                    except Exception as exc:  # noqa: BLE001 - the caller gets the error
                        done.set_exception(exc)
                continue
            key, batch = item
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]  # drop cancelled ones
            if batch:
                self._run_batch(key, batch)

    def _rows(self, loaded: LoadedModel, pending: list[_Pending]) -> list[Row]:
        """Decode rows for ``pending``; each resolves its future the moment it finishes."""
        rows = []
        for p in pending:
            try:
                row = make_rows(loaded, [p.request], None, time.perf_counter())[0]
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                p.future.set_exception(exc)
                continue
            row.on_done = lambda res, p=p, row=row: self._resolve(p, row, res)
            rows.append(row)
        return rows

    @staticmethod
    def _resolve(p: _Pending, row: Row, res: GenerationResult) -> None:
        # rows time from their start in the batch; callers wait from submit
        queued_ms = (row.started - p.submitted) * 1000
        first = None if res.first_token_ms is None or p.request.num_beams > 1 else res.first_token_ms + queued_ms
        if not p.future.done():
            p.future.set_result(replace(res, latency_ms=res.latency_ms + queued_ms, first_token_ms=first))

    def _joiner(self, key: str, loaded: LoadedModel, taken: list[_Pending]) -> Joiner:
        """Requests for ``key`` queued while its batch runs join it between two decode steps.

        Not while another model has requests waiting: the batch then finishes and the model whose
        request waited longest goes next, so a busy model cannot starve the others.
        """
        def join(free: int) -> list[Row]:
            got: list[_Pending] = []
            with self._cond:
                if any(q for k, q in self._queues.items() if k != key):
                    return []
                queue = self._queues.get(key)
                while queue and len(got) < free and queue[0].request.num_beams <= 1:
                    p = queue.popleft()
                    if p.future.set_running_or_notify_cancel():
                        got.append(p)
                if queue is not None and not queue:
                    del self._queues[key]
                self.joined += len(got)
            taken.extend(got)
            return self._rows(loaded, got)

        return join

    def _run_batch(self, key: str, batch: list[_Pending]) -> None:
        taken = list(batch)
        try:
            loaded = self.cache.get(key, prepared(batch[0].loader, self.max_batch_size))
            join = self._joiner(key, loaded, taken) if self.continuous else None
            run_rows(loaded, self._rows(loaded, batch), self.on_busy, join, self.max_batch_size)
        except BaseException as exc:  # noqa: BLE001 - every error goes to the waiting callers
            logger.warning("generation batch of %d for %s failed: %s", len(taken), key, exc)
            for p in taken:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._cond:
                self.batches_run += 1
                self.requests_served += len(taken)
                self.batch_sizes[len(batch)] += 1
        for p in taken:  # every row resolves its future when it finishes; this is a safety net
            if not p.future.done():
                p.future.set_exception(RuntimeError("generation ended without a result"))
