"""A llama.cpp generation engine with continuous batching: the GGUF counterpart of ``BatchingEngine``.

One background thread owns every llama.cpp call (model loads, contexts, ``llama_decode``, samplers).
Requests for the same GGUF file decode together as parallel sequences of ONE llama context
(``n_seq_max`` = ``max_batch_size``, one unified KV cache of ``n_ctx`` cells shared by them): each step
builds one ``llama_batch`` with the whole prompt of every sequence that joins at this step (logits for
its last prompt token only) and the last token of every running sequence, calls ``llama_decode`` once,
and picks each sequence's next token from its own logits (``llama_get_logits_ith``). A sequence that
finishes (end token, ``max_new_tokens``, the caller's ``should_stop``) answers its caller at once and
its KV cells are removed (``llama_memory_seq_rm``), so its slot and cells serve the next request;
requests that arrive meanwhile join at the next step.

Prompt starts that are already computed (the system prompt, a conversation's earlier turns) are
shared, not computed again: ``ml.inference.prompt_sharing``.

The caller renders and tokenizes the prompt with csra's HF tokenizer (``ml.inference.tokens``), so the
prompt ids are exactly those of the torch path, and the reply is detokenized, streamed, cut at the
end token and counted by the same code (``ml.inference.rows.Row``, ``ml.inference.tokens.TextStream``):
the text, its streamed pieces, ``completion_tokens`` and ``finish_reason`` follow the same rules.

Greedy requests take the argmax of the logits (numpy, first maximum on ties, like ``torch.argmax``).
Sampled requests (temperature > 0) use a llama.cpp sampler chain per sequence: temperature, then
top-p on the tempered distribution (csra's order), then ``dist`` seeded with the request's seed. Why
llama.cpp's samplers and not csra's torch sampler: they run in C on the logits buffer (no copy of a
vocabulary-sized array per token, no torch op, hence no second OpenMP team competing with llama.cpp's
threads on this thread), and each sequence owns its chain and RNG, so a seeded reply is reproducible
whatever else is in the batch. The price: a seed gives another reply than the torch engine's (other
RNG); greedy replies are the ones to compare.

Batch invariance (measured by ``tests/ml/inference/test_llamacpp.py`` on the tiny model): greedy ids
are the same alone and with 8 concurrent requests. llama.cpp does not promise bit-identical logits
across batch compositions (its matrix kernels and attention over a shared KV cache are not designed
for it, unlike ``ml.inference.invariance`` for torch); near-ties can in principle flip a greedy token.
On SmolLM2-135M at f16 (``bench/llamacpp_engine.py``, 64 tokens): 3 of 3 replies the same alone and
in a batch of 16, 15 of 16 the same as csra's torch engine.

Why one unified KV cache with flash attention (llama.cpp's default, "auto"): measured on the 2-core
machine, 1 thread, SmolLM2 f16, 16 concurrent 32-token replies: 106 tokens/s aggregate (67 alone);
with one KV cache per sequence (``kv_unified`` off) 68 tokens/s, with flash attention off 87.
Measured again on a 2-core Zen 3 (2026-12-04, 2 threads, the 16 chat prompts of ``bench/generate.py``,
64 tokens, the two layouts alternated in one process): a KV stream per sequence, with the running
sequences kept at consecutive ids (what llama.cpp needs to decode streams together) and prompt starts
copied between streams, was 0.94x the unified cache's tokens/s at 2,048 cells a sequence and 1.07x
at 512. Its attention scans only its own cells (1.15x in a bare llama_decode loop), but llama.cpp copies
only whole streams, and the prefix cache and the compaction copy one at almost every join and finish.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.inference.llamacpp_model import (  # noqa: F401  (re-exported: the worker and tests import them here)
    LlamaCppLoadError,
    LlamaCppModelInfo,
    ReplyDecoder,
    _install_log,
    _Model,
)
from ml.inference.owner_thread import IDLE_EXIT_SECONDS, OwnerThread
from ml.inference.prompt_sharing import fed, longest_start, step_entries
from ml.inference.rows import Row, check_steering
from ml.inference.tokens import TextStream
from ml.inference.types import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)
# --------------------------------------------------------------------------- requests and sequences


@dataclass
class _Pending:
    key: str
    prompt_ids: list[int]
    request: GenerationRequest
    decoder: ReplyDecoder
    future: Future[GenerationResult]
    submitted: float


@dataclass
class _Seq:
    """A running sequence: csra's row state plus its llama.cpp slot, position and sampler."""

    pending: _Pending
    row: Row
    seq_id: int
    reserved: int  # KV cells kept for it: prompt + the most tokens it may generate
    sampler: Any = None  # a llama.cpp sampler chain (temperature > 0), None for greedy
    pos: int = 0  # the position of the next token fed to llama.cpp


def _validate(prompt_ids: Sequence[int], request: GenerationRequest) -> None:
    if request.num_beams > 1:
        raise ValueError(f"beam search (num_beams={request.num_beams}) is not supported by the llama.cpp engine; "
                         "use num_beams=1 or csra's torch engine")
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, not {request.max_new_tokens}")
    check_steering(request)
    if request.temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {request.top_p}")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")


class LlamaCppEngine:
    """Continuous batching of GGUF models through llama.cpp, on one background thread.

    ``submit`` queues a request (prompt ids from csra's tokenizer) and returns a future. The thread
    serves the model whose oldest request waited longest; its requests run as sequences of one
    context, up to ``max_batch_size`` at once and as many as the ``n_ctx`` shared KV cells hold (each
    sequence reserves its prompt plus ``max_new_tokens``); the others wait for a free slot. Requests
    for the same model join the running sequences at the next decode step, except while another model
    has requests waiting (then the batch drains and that model goes next, so none starves). At most
    ``max_models`` models stay loaded (least recently used evicted, never the one decoding).

    A GGUF that fails to load fails the requests for that file with ``LlamaCppLoadError``; a failing
    ``llama_decode`` fails the sequences of that step. Other models keep being served.
    """

    def __init__(self, n_threads: int | None = None, max_batch_size: int = 16, n_ctx: int = 8192,
                 max_models: int = 2, on_busy: Callable[[], None] | None = None,
                 idle_exit_seconds: float = IDLE_EXIT_SECONDS, prefix_cache: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self.n_threads = n_threads or os.cpu_count() or 1
        self.max_batch_size, self.n_ctx, self.max_models = max_batch_size, n_ctx, max_models
        self.prefix_cache = prefix_cache
        self.on_busy = on_busy or (lambda: None)
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Pending]] = {}
        self._loads: deque[tuple[str, Future[LlamaCppModelInfo]]] = deque()
        # ends when idle (models stay loaded): its OpenMP team would slow the torch engine's (owner_thread)
        self._thread = OwnerThread("csra-llamacpp-engine", self._loop, idle_exit_seconds)
        self._running = False
        # owned by the engine thread
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._current: str | None = None
        self._active: list[_Seq] = []
        # counters (read under the lock)
        self._loaded: dict[str, LlamaCppModelInfo] = {}
        self.requests_served = 0
        self.steps = 0
        self.joined = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0  # the prompts' tokens, and those computed (the others' cells were shared)
        self.prompt_tokens_computed = 0
        self.step_sizes: Counter[int] = Counter()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LlamaCppEngine:
        """Accept requests (idempotent); the engine thread starts with the first one."""
        with self._cond:
            if not self._running:
                _install_log()
                self._running = True
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail the queued and running requests, free every model, stop the thread."""
        with self._cond:
            if not self._running:
                return
            self._running = False
            idle = not self._thread.alive
            self._cond.notify_all()
        if idle:  # no thread to shut down: free the models here
            self._shutdown()
        self._thread.join(timeout)

    def __enter__(self) -> LlamaCppEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests

    def submit(self, gguf_path: str | Path, prompt_ids: Sequence[int], request: GenerationRequest,
               decoder: ReplyDecoder) -> Future[GenerationResult]:
        """Queue ``request`` for the GGUF file ``gguf_path``; ``prompt_ids`` is the prompt tokenized by
        csra (``ml.inference.tokens.encode_prompt``), ``decoder`` that tokenizer and its stop ids.

        ``request.prompt`` is not tokenized again. Raises ValueError at once for beam search and
        invalid settings; a prompt too long for the context fails the future with ValueError.
        """
        _validate(prompt_ids, request)
        self.on_busy()
        future: Future[GenerationResult] = Future()
        key = str(Path(gguf_path).resolve())
        with self._cond:
            if not self._running:
                raise RuntimeError("the llama.cpp engine is not running (call start())")
            self._queues.setdefault(key, deque()).append(
                _Pending(key, [int(t) for t in prompt_ids], request, decoder, future, time.perf_counter()))
            self._thread.wake()
            self._cond.notify_all()
        return future

    def load(self, gguf_path: str | Path) -> LlamaCppModelInfo:
        return self.load_async(gguf_path).result()

    def load_async(self, gguf_path: str | Path) -> Future[LlamaCppModelInfo]:
        """Load ``gguf_path`` on the engine thread (a no-op when it is loaded); fails with LlamaCppLoadError."""
        self.on_busy()
        key = str(Path(gguf_path).resolve())
        future: Future[LlamaCppModelInfo] = Future()
        with self._cond:
            if not self._running:
                raise RuntimeError("the llama.cpp engine is not running (call start())")
            if key in self._loaded:
                future.set_result(self._loaded[key])
                return future
            self._loads.append((key, future))
            self._thread.wake()
            self._cond.notify_all()
        return future

    def stats(self) -> dict[str, Any]:
        """Models loaded, requests served, decode steps, sequences per step, requests queued and running."""
        with self._cond:
            return {"models": list(self._loaded), "requests": self.requests_served, "steps": self.steps,
                    "joined": self.joined, "tokens": self.tokens_generated,
                    "prompt_tokens": self.prompt_tokens, "prompt_tokens_computed": self.prompt_tokens_computed,
                    "step_sizes": dict(sorted(self.step_sizes.items())),
                    "queued": sum(len(q) for q in self._queues.values()), "running": len(self._active)}

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        idle = False
        try:
            while True:
                state = self._wait_for_work()
                if state != "work":
                    idle = state == "idle"
                    break
                self._run_loads()
                if not self._active:
                    self._pick_model()
                self._admit()
                self._step()
        except BaseException:
            logger.exception("the llama.cpp engine thread failed; its requests fail and it serves no more")
            with self._cond:
                self._running = False
            raise
        finally:
            if not idle:  # stopped (or failed): this thread frees everything
                with self._cond:
                    self._thread.ending()
                self._shutdown()

    def _wait_for_work(self) -> str:
        """"work"; "stop"; or "idle" after ``idle_exit_seconds`` without work (the thread ends, the models stay
        loaded, and the next request starts another thread)."""
        with self._cond:
            while True:
                if not self._running:
                    return "stop"
                if self._active or self._loads or any(self._queues.values()):
                    return "work"
                if not self._cond.wait(self._thread.idle_seconds) and self._running and not (
                        self._loads or any(self._queues.values())):
                    self._thread.ending()
                    return "idle"

    def _shutdown(self) -> None:
        error = RuntimeError("the llama.cpp engine stopped")
        with self._cond:
            self._running = False
            pending: list[Future[Any]] = [p.future for q in self._queues.values() for p in q]
            pending += [f for _, f in self._loads]
            self._queues.clear()
            self._loads.clear()
        for seq in self._active:
            pending.append(seq.pending.future)
            self._free(seq)
        self._active = []
        for f in pending:
            if not f.done():
                f.set_exception(error)
        for model in self._models.values():
            model.close()
        self._models.clear()
        with self._cond:
            self._loaded.clear()

    def _model(self, key: str) -> _Model:
        """``key`` loaded (LRU: the least recently used idle model goes when ``max_models`` are loaded)."""
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            with self._cond:
                self._loaded[key] = self._loaded.pop(key)  # stats() lists them least recently used first
            return model
        busy = self._current if self._active else None
        while len(self._models) >= self.max_models:
            idle = next((k for k in self._models if k != busy), None)
            if idle is None:
                raise RuntimeError("no model can be unloaded while a batch runs")  # never with max_models >= 1
            self._models.pop(idle).close()
            with self._cond:
                self._loaded.pop(idle, None)
            logger.info("llama.cpp model %s unloaded (LRU)", idle)
        started = time.perf_counter()
        model = _Model(key, self.n_ctx, self.max_batch_size, self.n_threads)
        self._models[key] = model
        with self._cond:
            self._loaded[key] = model.info
        logger.info("llama.cpp model %s loaded in %.2f s (%s)", key, time.perf_counter() - started,
                    model.info.description)
        return model

    def _run_loads(self) -> None:
        """Loads asked by ``load_async``; one that would evict the model decoding now waits for its batch."""
        with self._cond:
            loads = list(self._loads)
            self._loads.clear()
        deferred = []
        for key, future in loads:
            if not future.set_running_or_notify_cancel():
                continue
            if key not in self._models and self._active and self.max_models == 1:
                deferred.append((key, future))
                continue
            self.on_busy()
            try:
                future.set_result(self._model(key).info)
            except Exception as exc:  # noqa: BLE001 - the caller gets the error
                logger.warning("%s", exc)
                future.set_exception(exc)
                self._fail_queue(key, exc)
        if deferred:
            with self._cond:
                self._loads.extendleft(reversed(deferred))

    def _fail_queue(self, key: str, exc: BaseException) -> None:
        with self._cond:
            queue = self._queues.pop(key, deque())
        for p in queue:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(exc)

    def _pick_model(self) -> None:
        """Between batches: the model whose oldest request waited longest goes next."""
        with self._cond:
            heads = [(q[0].submitted, key) for key, q in self._queues.items() if q]
        self._current = min(heads)[1] if heads else None

    def _admit(self) -> None:
        """Requests for the current model join while slots and KV cells last (not while another model
        waits and a batch runs, nor while a load waits for this batch)."""
        key = self._current
        if key is None:
            return
        with self._cond:
            others = any(q for k, q in self._queues.items() if k != key) or bool(self._loads)
            queue = self._queues.get(key)
            if not queue or (self._active and others):
                return
        try:
            model = self._model(key)
        except Exception as exc:  # noqa: BLE001 - every request for this file gets the error
            logger.warning("%s", exc)
            self._fail_queue(key, exc)
            self._current = None
            return
        used = sum(s.reserved for s in self._active)
        joined = 0
        while len(self._active) < self.max_batch_size:
            with self._cond:
                if not queue:
                    break
                p = queue[0]
                need = self._cells(model, p)
                if need is not None and used + len(model.cached) + need > model.n_ctx:
                    model.drop_prefix()  # the cache gives its cells first
                if need is not None and used + need > model.n_ctx and self._active:
                    break  # waits until running sequences free their cells
                queue.popleft()
            if not p.future.set_running_or_notify_cancel():
                continue
            if need is None:
                p.future.set_exception(ValueError(
                    f"the prompt has {len(p.prompt_ids)} tokens: it does not fit the context of {model.n_ctx_seq} "
                    f"tokens of {key} (prompt and reply together); shorten the conversation"))
                continue
            bad = next((t for t in p.prompt_ids if not 0 <= t < model.n_vocab), None)
            if bad is not None:
                p.future.set_exception(ValueError(f"prompt token id {bad} is outside the vocabulary of {key} "
                                                  f"({model.n_vocab} tokens): wrong tokenizer for this GGUF?"))
                continue
            seq = self._sequence(model, p, need)
            if self.prefix_cache:
                self._share_prefix(model, seq)
            self._active.append(seq)
            used += need
            joined += 1
        with self._cond:
            if queue is not None and not queue and self._queues.get(key) is queue:
                del self._queues[key]
            if joined and len(self._active) > joined:
                self.joined += joined

    @staticmethod
    def _cells(model: _Model, p: _Pending) -> int | None:
        """KV cells a request needs: prompt + its reply cut to the context (None: the prompt does not fit)."""
        if len(p.prompt_ids) >= model.n_ctx_seq:
            return None
        return min(len(p.prompt_ids) + p.request.max_new_tokens, model.n_ctx_seq)

    def _share_prefix(self, model: _Model, seq: _Seq) -> None:
        """Give a new sequence the cells of the longest start of its prompt that the prefix cache or a
        running sequence already holds."""
        sources = [(model.cache_seq, model.cached)] + [(s.seq_id, fed(s)) for s in self._active]
        source, n = longest_start(seq.row.prompt_ids, sources)
        if n:
            model.share(source, seq.seq_id, n)
            seq.pos = n

    def _sequence(self, model: _Model, p: _Pending, need: int) -> _Seq:
        req = p.request
        room = need - len(p.prompt_ids)  # max_new_tokens, cut to what the context holds
        row = Row(request=replace(req, max_new_tokens=room) if room < req.max_new_tokens else req,
                  prompt_ids=p.prompt_ids, stops=p.decoder.stops, stream=TextStream(p.decoder.tokenizer, req.on_text),
                  generator=torch.Generator(),  # unused: llama.cpp samples (see the module docstring)
                  started=p.submitted)
        sampler = model.sampler(req.temperature, req.top_p, req.seed) if req.temperature > 0 else None
        return _Seq(pending=p, row=row, seq_id=model.free_seqs.pop(), reserved=need, sampler=sampler)

    def _free(self, seq: _Seq, keep: bool = False) -> None:
        """Give back ``seq``'s slot and cells; ``keep``: its cells stay as the prefix cache."""
        model = self._models.get(seq.pending.key)
        if model is not None:
            if keep and seq.pos > 0:
                model.keep_prefix(seq.seq_id, fed(seq))
            model.remove(seq.seq_id)
            if seq.sampler is not None:
                model.free_sampler(seq.sampler)
        seq.sampler = None

    def _finish(self, seq: _Seq) -> None:
        """A finished sequence: free its slot (its cells become the prefix cache), answer its caller."""
        self._free(seq, keep=self.prefix_cache)
        p, result = seq.pending, seq.row.finished()
        if not p.future.done():
            p.future.set_result(result)
        with self._cond:
            self.requests_served += 1
            self.tokens_generated += len(result.token_ids)

    def _step(self) -> None:
        """Cancel what the callers stopped, then one llama_decode for every running sequence."""
        for seq in list(self._active):
            try:
                seq.row.stop_if_cancelled()
            except Exception as exc:  # noqa: BLE001 - a broken should_stop fails its own request
                self._free(seq)
                seq.pending.future.set_exception(exc)
                self._active.remove(seq)
                continue
            if seq.row.done:
                self._finish(seq)
                self._active.remove(seq)
        if not self._active:
            return
        model = self._models[self._active[0].pending.key]
        entries, outputs, prompt_tokens, computed = step_entries(self._active)
        with self._cond:
            self.prompt_tokens += prompt_tokens
            self.prompt_tokens_computed += computed
        self.on_busy()
        try:
            model.decode(entries)
        except Exception as exc:  # noqa: BLE001 - the sequences of this step get the error
            logger.warning("%s", exc)
            for seq in self._active:
                self._free(seq)
                if not seq.pending.future.done():
                    seq.pending.future.set_exception(exc)
            self._active = []
            return
        size = len(self._active)
        with self._cond:
            self.steps += 1
            self.step_sizes[size] += 1
        for seq, index in zip(list(self._active), outputs, strict=True):
            row = seq.row
            row.peak_batch = max(row.peak_batch, size)
            row.steer(model.logits(index))  # a view of llama.cpp's buffer, which its sampler reads
            if seq.sampler is not None:
                token = model.sample(seq.sampler, index)
            else:
                token = int(np.argmax(model.logits(index)))
            row.add(token)
            if row.done:
                self._finish(seq)
                self._active.remove(seq)

