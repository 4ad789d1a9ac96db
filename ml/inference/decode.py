"""The decode loops: left-padded prefill and one token per step with a KV cache (causal LMs, with
rows joining between steps), encoder once and decoder step by step (T5), and beam search.

Every row keeps its own temperature / top_p / seed, its own ``max_new_tokens`` and its own
streaming callback. Rows that finished (or were stopped) leave the batch and its cache at once.
Per-row numbers equal those of the row alone when the model was prepared by
``ml.inference.selfcheck.prepare_model`` (see ``ml.inference.invariance``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from ml.inference.loops import LoopGuard
from ml.inference.rows import Row, sample_rows
from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id(loaded: LoadedModel) -> int:
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        pad = getattr(loaded.model.config, "pad_token_id", None)
    if pad is None:
        pad = loaded.tokenizer.eos_token_id
    return int(pad or 0)


def keep_active(rows: list[Row], *tensors: torch.Tensor, cache: Any) -> tuple[list[Row], list[torch.Tensor]]:
    """Drop finished rows from the batch, its tensors and the KV cache."""
    keep = [i for i, r in enumerate(rows) if not r.done]
    if len(keep) == len(rows):
        return rows, list(tensors)
    index = torch.tensor(keep, dtype=torch.long, device=tensors[0].device if tensors else None)
    if keep:
        cache.batch_select_indices(index)
    out = [t.index_select(0, index) for t in tensors]
    return [rows[i] for i in keep], out


Joiner = Callable[[int], list[Row]]


def prefill(loaded: LoadedModel, rows: list[Row]) -> tuple[list[Row], torch.Tensor, torch.Tensor,
                                                              torch.Tensor, Any]:
    """Left-padded prefill of ``rows`` and their first token: (unfinished rows, mask, next positions,
    last tokens, cache), all reduced to the unfinished rows."""
    input_ids, mask = _left_pad([r.prompt_ids for r in rows], pad_id(loaded), loaded.model.device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = loaded.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                       logits_to_keep=1)
    for row, token in zip(rows, sample_rows(rows, out.logits[:, -1, :]), strict=True):
        row.add(token)
    last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long, device=mask.device).unsqueeze(1)
    active, (mask, next_pos, last) = keep_active(rows, mask, position_ids[:, -1:] + 1, last, cache=out.cache)
    return active, mask, next_pos, last, out.cache


def _left_extend(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _joinable(cache: Any) -> bool:
    """A cache of plain full-attention layers, which rows can be appended to."""
    layers: list[Any] = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _merge_cache(cache: Any, other: Any) -> None:
    """Append ``other``'s rows to ``cache``, left-padding the shorter one with zeros (masked out)."""
    length = max(cache.get_seq_length(), other.get_seq_length())
    for a, b in zip(cache.layers, other.layers, strict=True):
        a.keys = torch.cat([_left_extend(a.keys, length, -2), _left_extend(b.keys, length, -2)])
        a.values = torch.cat([_left_extend(a.values, length, -2), _left_extend(b.values, length, -2)])


def decode_causal(loaded: LoadedModel, rows: list[Row], check_cancelled: Callable[[], None] | None,
                   join: Joiner | None = None, max_rows: int = 0) -> None:
    """Left-padded prefill, then one token per step for every unfinished row.

    ``join(free)`` (continuous batching), asked between steps while fewer than ``max_rows`` rows
    run, returns new rows: they are prefilled as a group and appended to the running batch (their
    cache and mask left-padded to a common length). Per-row numbers stay those of the row alone:
    attention reads only each row's real keys, Linear layers are row-invariant (see above).
    """
    rows, mask, next_pos, last, cache = prefill(loaded, rows)
    while True:
        if join is not None and len(rows) < max_rows and (not rows or _joinable(cache)):
            new = join(max_rows - len(rows))
            if new:
                new, mask2, next2, last2, cache2 = prefill(loaded, new)
                if new and rows:
                    _merge_cache(cache, cache2)  # same model, same layer types: joinable too
                    width = max(mask.shape[1], mask2.shape[1])
                    mask = torch.cat([_left_extend(mask, width, 1), _left_extend(mask2, width, 1)])
                    next_pos, last, rows = torch.cat([next_pos, next2]), torch.cat([last, last2]), rows + new
                elif new:
                    rows, mask, next_pos, last, cache = new, mask2, next2, last2, cache2
        for row in rows:
            row.stop_if_cancelled()
        rows, (mask, next_pos, last) = keep_active(rows, mask, next_pos, last, cache=cache)
        if not rows:
            return
        if check_cancelled is not None:
            check_cancelled()
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = loaded.model(input_ids=last, attention_mask=mask, position_ids=next_pos, cache=cache,
                           use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1
        for row, token in zip(rows, sample_rows(rows, out.logits[:, -1, :]), strict=True):
            row.add(token)
        last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long, device=mask.device).unsqueeze(1)
        rows, (mask, next_pos, last) = keep_active(rows, mask, next_pos, last, cache=cache)


def _decoder_start_id(loaded: LoadedModel) -> int:
    config = loaded.model.config
    start = getattr(config, "decoder_start_token_id", None)
    gen_config = getattr(loaded.model, "generation_config", None)
    if start is None and gen_config is not None:
        start = getattr(gen_config, "decoder_start_token_id", None)
    return int(start if start is not None else pad_id(loaded))


def decode_seq2seq(loaded: LoadedModel, rows: list[Row], check_cancelled: Callable[[], None] | None) -> None:
    """Encoder once (right padding, masked), then the decoder one token per step with its cache."""
    model = loaded.model
    input_ids, mask = _right_pad([r.prompt_ids for r in rows], pad_id(loaded), model.device)
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    last = torch.full((len(rows), 1), _decoder_start_id(loaded), dtype=torch.long, device=mask.device)
    cache = None
    while True:
        out = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=last, cache=cache,
                    use_cache=True)
        cache = out.cache
        for row, token in zip(rows, sample_rows(rows, out.logits[:, -1, :]), strict=True):
            row.add(token)
        last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long, device=mask.device).unsqueeze(1)
        for row in rows:
            row.stop_if_cancelled()
        rows, (hidden, mask, last) = keep_active(rows, hidden, mask, last, cache=cache)
        if not rows:
            return
        if check_cancelled is not None:
            check_cancelled()


class _BeamSteering(LogitsProcessor):
    """The row's copy bias, loop guard and length floor on every beam (``Row.copied``, ``LoopGuard`` and
    ``Row.ends_masked`` of that beam's reply so far)."""

    def __init__(self, row: Row, start: int) -> None:
        self.row, self.start = row, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for beam in range(input_ids.shape[0]):
            reply = input_ids[beam, self.start:].tolist()
            boosted = self.row.copied(reply)
            if boosted:
                scores[beam, boosted] += self.row.request.copy_bias
            banned = LoopGuard.of(reply, self.row.loops.n, self.row.loops.allowed).banned(reply)
            banned += self.row.ends_masked(reply)
            if banned:
                scores[beam, banned] = float("-inf")
        return scores


def beam_search(loaded: LoadedModel, row: Row) -> None:
    """``model.generate`` with beams for one request (beam search needs no per-row sampling)."""
    req = row.request
    ids = torch.tensor([row.prompt_ids], dtype=torch.long, device=loaded.model.device)
    stops = sorted(row.stops.every) or None
    model: Any = loaded.model  # transformers types generate() loosely
    start = len(row.prompt_ids) if loaded.arch == "causal" else 1  # where each beam's reply starts
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=req.num_beams, do_sample=False,
        max_new_tokens=req.max_new_tokens, eos_token_id=stops,  # min_new_tokens: in _BeamSteering, as Row.steer
        pad_token_id=pad_id(loaded), early_stopping=True,
        logits_processor=LogitsProcessorList([_BeamSteering(row, start)]),
    )
    generated = out[0].tolist()
    if loaded.arch == "causal":
        generated = generated[len(row.prompt_ids):]
    else:
        generated = generated[1:]  # the decoder start token
    pad = pad_id(loaded)
    while generated and generated[-1] == pad and pad not in row.stops.every:
        generated.pop()
    row.first_token_at = None
    for token in generated:  # replays the tokens: same end handling, text and counts as sampling
        if row.done:
            break
        row.add(token)
    if not row.done:  # generate stopped on its own (e.g. a stop string): treat as a stop
        row.finish_reason = "stop"
        row._finish(time.perf_counter())
    assert row.result is not None
    row.result.first_token_ms = None


def decode_rows(loaded: LoadedModel, rows: list[Row], check_cancelled: Callable[[], None] | None,
                 join: Joiner | None = None, max_rows: int = 0) -> None:
    """The decode loops for a model already prepared (inside ``torch.inference_mode``)."""
    sampled = [r for r in rows if r.request.num_beams <= 1]
    if sampled and loaded.arch == "seq2seq":
        decode_seq2seq(loaded, sampled, check_cancelled)
    elif sampled:
        decode_causal(loaded, sampled, check_cancelled, join, max_rows)
    for row in rows:
        if row.request.num_beams > 1:
            if check_cancelled is not None:
                check_cancelled()
            beam_search(loaded, row)
