"""Generating replies for many prompts at once: one batch, or length-sorted batches (evaluation)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ml.inference.decode import Joiner, decode_rows
from ml.inference.rows import Row, make_rows
from ml.inference.selfcheck import prepare_model
from ml.inference.tokens import encode_prompt
from ml.inference.types import GenerationRequest, GenerationResult
from models_store.loading import LoadedModel


def run_rows(loaded: LoadedModel, rows: list[Row], check_cancelled: Callable[[], None] | None,
             join: Joiner | None = None, max_rows: int = 0) -> None:
    """Decode ``rows`` (sampled ones as one batch, which ``join`` may grow; causal models only),
    then the beam-search ones one by one."""
    prepare_model(loaded, max(max_rows, len(rows)))
    with torch.inference_mode():
        decode_rows(loaded, rows, check_cancelled, join, max_rows)


def _run(loaded: LoadedModel, requests: Sequence[GenerationRequest], prompt_ids: Sequence[list[int]] | None,
         check_cancelled: Callable[[], None] | None) -> list[GenerationResult]:
    if not requests:
        return []
    rows = make_rows(loaded, requests, prompt_ids, time.perf_counter())
    run_rows(loaded, rows, check_cancelled)
    return [r.finished() for r in rows]


def generate_batch(loaded: LoadedModel, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Complete all ``requests`` in one batch; results in the order of ``requests``."""
    return _run(loaded, requests, None, None)


def generate_many(
    loaded: LoadedModel,
    requests: Sequence[GenerationRequest],
    batch_size: int = 16,
    on_batch_done: Callable[[int, int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    on_results: Callable[[list[int], list[GenerationResult]], None] | None = None,
) -> list[GenerationResult]:
    """Complete many requests in batches of similar prompt length; results in input order.

    ``on_batch_done(done, total)`` after each batch; ``on_results(indices, results)`` too, with
    the batch's request indices and results (to checkpoint them); ``check_cancelled()`` before
    each batch and at each decode step (it raises to stop).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ids = [encode_prompt(loaded, r.prompt) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: len(ids[i]))
    results: dict[int, GenerationResult] = {}
    done = 0
    for start in range(0, len(order), batch_size):
        if check_cancelled is not None:
            check_cancelled()
        chunk = order[start: start + batch_size]
        out = _run(loaded, [requests[i] for i in chunk], [ids[i] for i in chunk], check_cancelled)
        for i, res in zip(chunk, out, strict=True):
            results[i] = res
        if on_results is not None:
            on_results(chunk, out)
        done += len(chunk)
        if on_batch_done is not None:
            on_batch_done(done, len(requests))
    return [results[i] for i in range(len(requests))]
