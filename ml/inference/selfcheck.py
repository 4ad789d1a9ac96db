"""Making a model's generation batch-invariant on this machine, and verifying it (once per model)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ml.device import place_for_inference
from ml.inference.decode import decode_causal, decode_rows
from ml.inference.invariance import CANDIDATES, InvarianceReport, LinearPlan, select_linear_plan, use_rowwise_attention
from ml.inference.rows import Row, make_rows
from ml.inference.tokens import encode_prompt
from ml.inference.types import GenerationRequest, Loader
from models_store.loading import LoadedModel


def prepare_model(loaded: LoadedModel, max_batch: int = 16,
                  candidates: Sequence[LinearPlan] = CANDIDATES) -> dict[str, Any]:
    """Make a model's generation batch-invariant on this machine and verify it (once per model).

    Picks a row-invariant Linear plan for this CPU, switches attention to the row-wise one, then
    decodes a few prompts alone and batched and compares their logits bit for bit. The report
    (``loaded.invariance``) says whether greedy text is the same alone and in any batch; when it
    is not, that is logged as an error and shown in ``/health`` and in job results.
    """
    if loaded.invariance is not None:
        return loaded.invariance
    started = time.perf_counter()
    place_for_inference(loaded)  # CSRA_DEVICE: a GPU when present (bf16 there); the CPU path is unchanged
    plan, tries = select_linear_plan(loaded.model, max_batch, candidates)
    attention = use_rowwise_attention(loaded.model)
    kernels_ok = tries[-1]["plan"] == plan.name and tries[-1]["invariant"]
    same, detail = verify_model(loaded)
    if not kernels_ok:
        detail = f"no Linear plan is row-invariant on this CPU ({tries[-1]['failures'][0]} differs); " + detail
    report = InvarianceReport(batch_invariant=kernels_ok and same, linear_plan=plan.name, attention=attention,
                              detail=detail, seconds=round(time.perf_counter() - started, 3), linear_tries=tries)
    loaded.invariance = report.as_dict()
    report.log(type(loaded.model).__name__)
    return loaded.invariance


CHECK_PROMPTS = ("Hi", "Where is my refund? I sent the item back two weeks ago.", "cancel order 123 please")


def verify_model(loaded: LoadedModel, steps: int = 3) -> tuple[bool, str]:
    """Greedy-decode ``CHECK_PROMPTS`` alone and as one batch (causal models: the last prompt joins
    the running batch) on the model as it is set up; (whether every step's logits are equal, detail)."""
    ids = [encode_prompt(loaded, p) for p in CHECK_PROMPTS]

    def rows(indices: Sequence[int]) -> list[Row]:
        made = make_rows(loaded, [GenerationRequest(prompt="", max_new_tokens=steps) for _ in indices],
                          [ids[i] for i in indices], time.perf_counter())
        for row in made:
            row.logits = []
        return made

    with torch.inference_mode():
        alone = [rows([i])[0] for i in range(len(ids))]
        for row in alone:
            decode_rows(loaded, [row], None)
        together = rows(range(len(ids)))
        if loaded.arch == "causal":  # the last row joins between two decode steps (continuous batching)
            pending = together[-1:]
            decode_causal(loaded, together[:-1], None, lambda free: [pending.pop()] if pending else [], len(ids))
        else:
            decode_rows(loaded, together, None)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        for step, (la, lb) in enumerate(zip(a.logits or [], b.logits or [], strict=False)):
            if not torch.equal(la, lb):
                diff = float((la - lb).abs().max())
                return False, f"prompt {i} step {step}: logits alone and batched differ by up to {diff:.2e}"
        if len(a.logits or []) != len(b.logits or []):
            return False, f"prompt {i}: {len(a.logits or [])} steps alone, {len(b.logits or [])} batched"
    return True, f"{len(ids)} prompts x {steps} steps: logits alone and batched identical"


def prepared(loader: Loader, max_batch: int = 16) -> Loader:
    """``loader`` followed by ``prepare_model``, so that the cache sizes the model as it will run."""
    def load() -> LoadedModel:
        loaded = loader()
        prepare_model(loaded, max_batch)
        return loaded

    return load
