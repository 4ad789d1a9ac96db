"""Batch invariance: every row's numbers independent of the batch, verified at load time.

Greedy decoding must give the same text for a request whether it ran alone or in any batch
(evaluation compares models on it; a chat reply must not depend on who else is chatting). Two
kinds of CPU kernels break that, and this module is the one place that works around them, with
private or global machinery fenced in here:

* **GEMM (every Linear).** BLAS libraries pick their kernel (and its blocking of the sum) by the
  row count, so a row's values change in the last bits with the number of rows beside it. Which
  row counts agree depends on the library *and the CPU*: MKL dispatches by CPU vendor. On AMD it
  runs its generic AVX2 code, where multiples of 4 rows agree; on an Intel Xeon with AVX-512 it
  runs its AVX-512 code, where 2-15 rows agree with each other but 1 row and 16+ rows each take
  another kernel (reproduced on an AVX-512 AMD by making MKL take its Intel path; see
  tests/ml/inference/test_invariance.py). A ``LinearPlan`` says how a Linear runs:

  - ``onednn``: float32 weights pre-packed once for oneDNN (``torch.ops.mkldnn._linear_pointwise``,
    the op torch's CPU inductor uses), each call on at least 2 rows. Fastest for few rows.
  - ``mkl-blocks``: MKL through ``F.linear`` in blocks of at most 12 rows, each padded with zero
    rows to a multiple of 4, so MKL only ever sees 4, 8 or 12 rows (agrees on both code paths).

  Neither is assumed: ``select_linear_plan`` checks each candidate on the model's own Linear
  shapes (rows alone against rows in batches of many sizes) and takes the first that passes.

* **Attention over left padding.** Softmax and the weighted sum reduce over padding + real keys
  in another order than over the real keys alone, and SDPA takes other kernels with a mask. The
  ``csra_rowwise`` attention runs SDPA row by row on each row's real keys and queries: exactly the
  tensors the row would have alone (T5: also its slice of the relative position bias).

Elementwise ops, norms and embeddings are per token already; sampling works on one row's logits.
The model-level check in ``ml.inference.selfcheck.verify_model`` then decodes a few prompts alone and
batched on the path in use and compares the logits bit for bit; when anything differs, the model
is reported as not batch-invariant (logged, in ``/health`` and in job results), never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from types import MethodType
from typing import Any

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

logger = logging.getLogger(__name__)

ROWWISE_ATTENTION = "csra_rowwise"
# Row counts the Linear check compares with rows alone: every decode batch size up to 17, and
# the larger counts a prefill (batch x prompt tokens) produces. Huge layers (the output layer)
# only ever see one row per request (``logits_to_keep=1``), so they are checked up to the batch size.
CHECK_ROWS = (*range(2, 18), 24, 31, 32, 33, 64, 100, 130)
HUGE_LAYER = 8_000_000  # weights; above this, rows beyond the largest batch are not checked


# =========================================================================== Linear plans


@dataclass(frozen=True)
class LinearPlan:
    """How every float32 ``nn.Linear`` of a model runs: an optional per-module setup, and a forward."""

    name: str
    forward: Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]
    setup: Callable[[torch.nn.Linear], None] | None = None
    available: Callable[[], bool] = lambda: True


def _blocks_forward(self: torch.nn.Linear, x: torch.Tensor, block: int = 12, multiple: int = 4) -> torch.Tensor:
    """``F.linear`` in blocks of at most ``block`` rows, each padded to a multiple of ``multiple``."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])
    outs = []
    for start in range(0, rows, block):
        chunk = flat[start: start + block]
        n = chunk.shape[0]
        padded = -(-n // multiple) * multiple
        if padded != n:
            chunk = torch.cat([chunk, chunk.new_zeros(padded - n, chunk.shape[1])])
        outs.append(torch.nn.functional.linear(chunk, self.weight, self.bias)[:n])
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(*x.shape[:-1], out.shape[-1])


ONEDNN_MIN_ROWS = 2
STATE = "_csra_linear"  # the per-module state a plan keeps (set with setattr: nn.Module types its attributes)


@dataclass
class LinearState:
    """What a plan keeps on one Linear: its name, and oneDNN's packed weight with the version it was packed at."""

    plan: str
    packed: torch.Tensor | None = None
    packed_version: int = -1


def linear_state(module: torch.nn.Module) -> LinearState | None:
    state = getattr(module, STATE, None)
    return state if isinstance(state, LinearState) else None


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _onednn_setup(module: torch.nn.Linear) -> None:
    state = linear_state(module)
    assert state is not None
    with torch.no_grad():
        state.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 16)
    state.packed_version = module.weight._version


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """float32 Linear through oneDNN on the pre-packed weight, on >= 2 rows.

    A weight changed in place after packing (its ``_version`` moved), training and autograd go
    through ``mkl-blocks`` instead, so a stale packed copy is never used.
    """
    state = linear_state(self)
    if state is None or state.packed is None or self.training or self.weight._version != state.packed_version or (
            torch.is_grad_enabled() and self.weight.requires_grad):
        return _blocks_forward(self, x)
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows < ONEDNN_MIN_ROWS:
        flat = torch.cat([flat, flat.new_zeros(ONEDNN_MIN_ROWS - rows, x.shape[-1])])
    out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), state.packed, self.bias, "none", [], "")
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


ONEDNN = LinearPlan("onednn", _onednn_forward, _onednn_setup, _onednn_available)
MKL_BLOCKS = LinearPlan("mkl-blocks", _blocks_forward)
# Fastest first. ``select_linear_plan`` takes the first one that is row-invariant on this machine.
CANDIDATES: tuple[LinearPlan, ...] = (ONEDNN, MKL_BLOCKS)


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]


def apply_linear_plan(model: torch.nn.Module, plan: LinearPlan) -> None:
    """Run every float32 Linear of ``model`` through ``plan`` (replacing any earlier plan).

    The forward is replaced per instance (``setattr``): the model's own classes stay untouched, so
    the same model class loaded elsewhere (training) runs stock ``nn.Linear``.
    """
    for module in _linears(model):
        setattr(module, STATE, LinearState(plan.name))
        if plan.setup is not None:
            plan.setup(module)
        setattr(module, "forward", MethodType(plan.forward, module))  # noqa: B010 - nn.Module types forward


def linear_plan_of(model: torch.nn.Module) -> str | None:
    """The plan the model's Linears run through (None: stock ``nn.Linear``)."""
    names = {state.plan if (state := linear_state(m)) else None for m in _linears(model)}
    return names.pop() if len(names) == 1 else None


def packed_bytes(model: torch.nn.Module) -> int:
    """Memory of oneDNN's packed weight copies (opaque tensors: counted as the weight's size)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _linears(model)
               if (state := linear_state(m)) is not None and state.packed is not None)


@dataclass
class RowCheck:
    """The outcome of comparing rows alone with the same rows in batches."""

    invariant: bool
    checked: int  # row counts compared, over all shapes
    failures: list[str] = field(default_factory=list)  # "576x1536 at 16 rows"


def check_linear_rows(modules: Iterable[torch.nn.Linear], max_batch: int, seed: int = 0) -> RowCheck:
    """Compare each module's rows computed alone with the same rows inside batches of many sizes.

    One module per distinct shape is enough: kernels are chosen by shape, not by values. The
    modules run as they are set up (their current plan).
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[tuple[int, int, bool]] = set()
    result = RowCheck(invariant=True, checked=0)
    with torch.inference_mode():
        for module in modules:
            key = (module.in_features, module.out_features, module.bias is not None)
            if key in seen:
                continue
            seen.add(key)
            huge = module.weight.numel() > HUGE_LAYER
            counts = [n for n in CHECK_ROWS if not huge or n <= max(max_batch, 2)]
            x = torch.randn(max(counts), module.in_features, generator=gen).to(module.weight.device)
            alone = torch.cat([module(x[i: i + 1]) for i in range(max(counts))])
            for n in counts:
                result.checked += 1
                if not torch.equal(module(x[:n]), alone[:n]):
                    result.invariant = False
                    result.failures.append(f"{module.in_features}x{module.out_features} at {n} rows")
    return result


def select_linear_plan(model: torch.nn.Module, max_batch: int,
                       candidates: Sequence[LinearPlan] = CANDIDATES) -> tuple[LinearPlan, list[dict[str, Any]]]:
    """Apply the first candidate whose rows do not depend on the row count here; report every try.

    When none passes, the first available candidate stays applied (the fastest) and the report
    says so: batched greedy text may then differ from unbatched.
    """
    tried: list[dict[str, Any]] = []
    usable = [p for p in candidates if p.available()]
    if not usable:
        raise RuntimeError("no Linear plan is available in this torch build")
    for plan in usable:
        apply_linear_plan(model, plan)
        check = check_linear_rows(_linears(model), max_batch)
        tried.append({"plan": plan.name, "invariant": check.invariant, "row_counts_checked": check.checked,
                      "failures": check.failures[:5]})
        if check.invariant:
            return plan, tried
    apply_linear_plan(model, usable[0])
    return usable[0], tried


# =========================================================================== row-wise attention


def _row_ranges(mask: torch.Tensor | None, batch: int, kv_length: int) -> list[tuple[int, int]] | None:
    """Each row's real keys [start, end) from a 4D SDPA mask (None: all keys).

    Read from the last query's row (with causal masks it sees every real key). None when a
    row's keys are not one contiguous range: not a padding mask this module knows.
    """
    if mask is None:
        return [(0, kv_length)] * batch
    seen = mask[:, 0, -1, :] if mask.dtype == torch.bool else mask[:, 0, -1, :] == 0
    seen = seen.expand(batch, kv_length)
    idx = torch.arange(kv_length, device=seen.device)
    start = torch.where(seen, idx, kv_length).amin(dim=-1)
    end = torch.where(seen, idx + 1, 0).amax(dim=-1)
    width = (end - start).clamp(min=0)
    if bool((seen.sum(dim=-1) != width).any()):
        return None
    return [(int(s), int(s + w)) for s, w in zip(start.tolist(), width.tolist(), strict=True)]


def _row_queries(kind: str, start: int, end: int, q_length: int, kv_length: int) -> tuple[int, int]:
    """The real queries [first, last) of a row whose real keys are [start, end)."""
    if kind == "causal":  # the queries are the last q_length key positions
        return max(0, start - (kv_length - q_length)), q_length - (kv_length - end)
    if kind == "cross":  # decoder queries over encoder keys: every query is real
        return 0, q_length
    return start, end  # bidirectional self-attention: queries and keys are the same positions


def _row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, causal: bool,
                   bias: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """SDPA for one row: q (1, heads, n_q, d), k and v (1, kv_heads, n_k, d) -> (1, heads, n_q, d).

    Causal masks are bottom-right aligned (the queries are the last key positions). A single
    query (a decode step) runs its query heads as the queries of their shared key/value head
    (no repeated keys); its result is the same as with repeated keys up to rounding, and always
    the same whatever the batch.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if n_q == 1 and bias is None:
        heads, dim = q.shape[1], q.shape[3]
        packed = q.reshape(1, heads // groups, groups, dim)
        return sdpa(packed, k, v, scale=scaling).reshape(1, heads, 1, v.shape[-1])
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    causal = causal and n_q > 1
    if bias is None and (not causal or n_q == n_k):
        return sdpa(q, k, v, scale=scaling, is_causal=causal)
    allowed = (torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
               if causal else None)
    if bias is None:
        return sdpa(q, k, v, attn_mask=allowed, scale=scaling)
    mask = bias if allowed is None else bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)
    return sdpa(q, k, v, attn_mask=mask.to(q.dtype).contiguous(), scale=scaling)


def rowwise_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, position_bias: torch.Tensor | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention computed row by row on the row's real (unpadded) keys and queries.

    Each row gets exactly the SDPA call it would get alone, so its result does not depend on the
    batch: causal self-attention (left padding), bidirectional encoder self-attention and
    decoder cross-attention (any padding side), with T5's relative position bias. Training,
    sliding windows, soft-capping and unusual masks go to transformers' SDPA implementation.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kind = "causal" if causal else ("cross" if getattr(module, "is_decoder", False) else "self")
    batch, heads, q_length, _ = query.shape
    kv_length = key.shape[2]
    plain = not (module.training or dropout > 0 or kwargs.get("sliding_window") or kwargs.get("softcap") is not None
                 or (attention_mask is not None and attention_mask.dim() != 4)
                 or (kind == "self" and q_length != kv_length))
    ranges = _row_ranges(attention_mask, batch, kv_length) if plain else None
    if ranges is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    out = query.new_zeros(batch, q_length, heads, value.shape[-1])
    for b, (start, end) in enumerate(ranges):
        first, last = _row_queries(kind, start, end, q_length, kv_length)
        if end <= start or last <= first:
            continue  # a row of padding only
        bias = None
        if position_bias is not None:
            pb = min(b, position_bias.shape[0] - 1)
            bias = position_bias[pb: pb + 1, :, first:last, start:end]
        o = _row_attention(query[b: b + 1, :, first:last], key[b: b + 1, :, start:end],
                           value[b: b + 1, :, start:end], groups, kind == "causal", bias, scaling)
        out[b, first:last] = o[0].transpose(0, 1)
    return out, None


def use_rowwise_attention(model: Any) -> str:
    """Switch ``model`` to the row-wise attention (registered with transformers on first use).

    Returns the attention implementation in use: ``csra_rowwise``, or the model's own when it has
    no attention interface (then the model-level check decides whether it is invariant).
    """
    if ROWWISE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ROWWISE_ATTENTION, rowwise_attention_forward)
        AttentionMaskInterface.register(ROWWISE_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(ROWWISE_ATTENTION)
        return ROWWISE_ATTENTION
    except Exception as exc:  # noqa: BLE001 - a model without the interface keeps its own attention
        logger.warning("%s keeps its attention (%s)", type(model).__name__, exc)
        return str(getattr(model.config, "_attn_implementation", "unknown"))


# =========================================================================== the report


@dataclass
class InvarianceReport:
    """What the load-time self-check found for one model on this machine."""

    batch_invariant: bool
    linear_plan: str
    attention: str
    detail: str
    seconds: float
    linear_tries: list[dict[str, Any]] = field(default_factory=list)
    cpu: str = field(default_factory=lambda: cpu_description())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def log(self, model_name: str) -> None:
        if self.batch_invariant:
            logger.info("batch invariance verified for %s in %.2f s: Linear via %s, attention %s (%s)", model_name,
                        self.seconds, self.linear_plan, self.attention, self.cpu)
        else:
            logger.error("BATCH INVARIANCE IS OFF for %s on this machine (%s): %s. Greedy text may differ between "
                         "a request alone and in a batch; Linear via %s, attention %s.", model_name, self.cpu,
                         self.detail, self.linear_plan, self.attention)


def cpu_description() -> str:
    """The CPU model and torch's SIMD level, for reports (kernels are chosen per CPU)."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
