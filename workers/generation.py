"""Batched text generation for evaluation and chat: a decode loop, a model cache, a batching engine.

* ``generate_batch`` runs one batch through a custom decode loop (not ``model.generate``), so that
  every row keeps its own temperature / top_p / seed (one ``torch.Generator`` per row), its own
  ``max_new_tokens`` and its own streaming callback. Causal LMs are left-padded with an attention
  mask and position ids counted from each row's first real token; encoder-decoder models (T5) run
  the encoder once and the decoder step by step. Both keep a KV cache, and rows that finished are
  dropped from the batch (and from the cache), so they stop costing compute.
* ``generate_many`` sorts requests by prompt length into batches and returns results in input order.
* ``ModelCache`` keeps loaded models in a bounded LRU; ``BatchingEngine`` owns the model calls in one
  background thread: requests that arrive while a batch runs join it between two decode steps
  (continuous batching; beam search and encoder-decoder models join the next batch instead).

Greedy decoding gives the same text for a request whether it ran alone or in any batch: each
row's numbers are computed independently of the other rows (``workers.invariance``), and a
self-check verifies it when a model is loaded (``prepare_model``); bench/generate_model.py measures it.

Only workers (and tests, benchmarks) import this module: it pulls in torch and transformers.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from models_store.loading import LoadedModel
from workers.invariance import (
    CANDIDATES,
    InvarianceReport,
    LinearPlan,
    packed_bytes,
    select_linear_plan,
    use_rowwise_attention,
)
from workers.prompting import has_chat_template
from workers.training import end_token_ids

logger = logging.getLogger(__name__)

Loader = Callable[[], LoadedModel]

# =========================================================================== requests and results


@dataclass
class GenerationRequest:
    """One prompt to complete, with its own decoding settings.

    ``prompt`` is already rendered (``workers.prompting.render_prompt``). ``temperature`` 0 means
    greedy; ``seed`` makes sampling reproducible (None: a fresh random seed). ``num_beams`` > 1 uses
    beam search through ``model.generate`` (one request at a time, no streaming of partial text:
    ``on_text`` then gets the whole reply at once). ``on_text`` receives each new piece of decoded
    text; the pieces concatenate to ``GenerationResult.text``. ``should_stop`` is asked before every
    decode step: once it answers True the row leaves the batch at that step and finishes as
    "cancelled" with the text streamed so far.
    """

    prompt: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    on_text: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class GenerationResult:
    """A finished reply.

    ``text``: the reply without special tokens, leading and trailing whitespace removed.
    ``completion_tokens`` counts every generated token, the end token included.
    ``finish_reason``: "stop" (end token), "length" (``max_new_tokens`` reached) or "cancelled".
    ``latency_ms``: from the start of the batch (of ``submit`` for ``BatchingEngine``) to the
    row's last token; ``first_token_ms`` likewise to its first token (None for beam search).
    ``token_ids``: the generated tokens (end token included), for debugging and tests.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: float
    first_token_ms: float | None
    token_ids: list[int] = field(default_factory=list, repr=False)


# =========================================================================== tokens


@dataclass(frozen=True)
class StopTokens:
    """Token ids that end a reply: single ids, plus multi-token end sequences (rare templates)."""

    ids: frozenset[int]
    sequences: tuple[tuple[int, ...], ...] = ()

    def match(self, generated: Sequence[int]) -> int:
        """How many trailing tokens of ``generated`` form an end marker (0: none)."""
        if generated and generated[-1] in self.ids:
            return 1
        for seq in self.sequences:
            if len(generated) >= len(seq) and tuple(generated[-len(seq):]) == seq:
                return len(seq)
        return 0


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_tokens(loaded: LoadedModel) -> StopTokens:
    """eos (tokenizer, model config, generation config) and the chat template's end-of-turn token."""
    ids = set(_as_ids(loaded.tokenizer.eos_token_id))
    ids.update(_as_ids(getattr(loaded.model.config, "eos_token_id", None)))
    gen_config = getattr(loaded.model, "generation_config", None)
    ids.update(_as_ids(getattr(gen_config, "eos_token_id", None)))
    end = end_token_ids(loaded.tokenizer, loaded.arch)
    sequences: tuple[tuple[int, ...], ...] = ()
    if len(end) == 1:
        ids.add(end[0])
    elif len(end) > 1:
        sequences = (tuple(end),)
    return StopTokens(frozenset(ids), sequences)


def encode_prompt(loaded: LoadedModel, prompt: str) -> list[int]:
    """Prompt token ids, tokenized exactly as training does (``workers.training.ExampleEncoder``).

    Chat templates carry their own special tokens; plain prompts (and T5's encoder) get the
    tokenizer's (BOS, ``</s>``).
    """
    chat = has_chat_template(loaded.tokenizer)
    special = not chat or loaded.arch == "seq2seq"
    ids = loaded.tokenizer(prompt, add_special_tokens=special)["input_ids"]
    if not ids:
        fallback = loaded.tokenizer.bos_token_id
        if fallback is None:
            fallback = loaded.tokenizer.eos_token_id
        ids = [fallback]
    return list(ids)


def _max_prompt_tokens(loaded: LoadedModel, max_new_tokens: int) -> int | None:
    """The longest prompt a causal LM can take with ``max_new_tokens`` after it (None: no limit)."""
    if loaded.arch != "causal":
        return None
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    return max(int(limit) - max_new_tokens, 1) if limit else None


# =========================================================================== streaming text


class TextStream:
    """Incremental detokenization of one row.

    Decodes the whole reply each time (so the pieces always add up to the final decode), emits
    only text that can no longer change: no incomplete UTF-8 character (``\\ufffd`` at the end),
    no leading whitespace, and trailing whitespace only once something follows it. The final text
    is the stripped decode, which equals the concatenation of all emitted pieces.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.emitted = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _emit(self, delta: str) -> None:
        if not delta:
            return
        self.emitted += delta
        if self.on_text is None:
            return
        try:
            self.on_text(delta)
        except Exception:  # one row's broken consumer must not fail the other rows of the batch
            logger.warning("on_text callback failed; no more streaming for this request", exc_info=True)
            self.on_text = None

    def push(self, ids: Sequence[int]) -> None:
        """The reply so far (``ids``, end tokens excluded) -> emit what is now stable."""
        if self.on_text is None:
            return  # nothing to stream: decode once at the end
        text = self._decode(ids).lstrip()
        if text.endswith("\ufffd"):
            return
        stable = text.rstrip()
        if stable.startswith(self.emitted):
            self._emit(stable[len(self.emitted):])

    def finish(self, ids: Sequence[int]) -> str:
        """The final text; emits the rest and returns the concatenation of everything emitted."""
        text = self._decode(ids).strip()
        if text.startswith(self.emitted):
            self._emit(text[len(self.emitted):])
            return self.emitted
        # A tokenizer whose decode changed text already streamed (never seen with BPE/SentencePiece):
        # keep the promise that the pieces add up to the text.
        logger.warning("decoded text changed after it was streamed; keeping the streamed prefix")
        self._emit(text[len(self.emitted):] if len(text) > len(self.emitted) else "")
        return self.emitted


# =========================================================================== sampling


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from a row's float32 logits: argmax when ``temperature`` <= 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = (cumulative - sorted_probs) < top_p  # the smallest prefix with mass >= top_p (never empty)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


# =========================================================================== one row's state


@dataclass
class _Row:
    """Decode state of one request inside a batch."""

    request: GenerationRequest
    prompt_ids: list[int]
    stops: StopTokens
    stream: TextStream
    generator: torch.Generator
    started: float
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_at: float | None = None
    result: GenerationResult | None = None
    on_done: Callable[[GenerationResult], None] | None = None
    logits: list[torch.Tensor] | None = None  # each step's logits, kept only by the self-check

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def stop_if_cancelled(self) -> None:
        """Finish now, as "cancelled", when the caller no longer wants this reply (no more text is streamed)."""
        stop = self.request.should_stop
        if not self.done and stop is not None and stop():
            self.finish_reason = "cancelled"
            self._finish(time.perf_counter())

    def add(self, token: int) -> None:
        """Append a token; finish on an end marker or at ``max_new_tokens``; stream new text."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token)
        if self.stops.match(self.generated):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None:
            self.stream.push(self.generated)
        else:
            self._finish(now)

    def _finish(self, now: float) -> None:
        cut = self.stops.match(self.generated) if self.finish_reason == "stop" else 0
        reply = self.generated[: len(self.generated) - cut]
        # a cancelled reply ends with what was already streamed: nothing more reaches the caller
        text = self.stream.emitted if self.finish_reason == "cancelled" else self.stream.finish(reply)
        first = None if self.first_token_at is None else (self.first_token_at - self.started) * 1000
        self.result = GenerationResult(
            text=text, prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated),
            finish_reason=self.finish_reason or "length", latency_ms=(now - self.started) * 1000,
            first_token_ms=first, token_ids=list(self.generated),
        )
        if self.on_done is not None:
            try:
                self.on_done(self.result)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the other rows
                logger.warning("a finished-row callback failed", exc_info=True)


def _sample_rows(rows: Sequence[_Row], logits: torch.Tensor) -> list[int]:
    """The next token of each row (greedy rows in one argmax, sampled rows one by one)."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.logits is not None:
            row.logits.append(logits[i].clone())
        if row.request.temperature > 0:
            tokens[i] = sample_token(logits[i], row.request.temperature, row.request.top_p, row.generator)
    return tokens


# =========================================================================== batch invariance


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

    def rows(indices: Sequence[int]) -> list[_Row]:
        made = _make_rows(loaded, [GenerationRequest(prompt="", max_new_tokens=steps) for _ in indices],
                          [ids[i] for i in indices], time.perf_counter())
        for row in made:
            row.logits = []
        return made

    with torch.inference_mode():
        alone = [rows([i])[0] for i in range(len(ids))]
        for row in alone:
            _decode_rows(loaded, [row], None)
        together = rows(range(len(ids)))
        if loaded.arch == "causal":  # the last row joins between two decode steps (continuous batching)
            pending = together[-1:]
            _decode_causal(loaded, together[:-1], None, lambda free: [pending.pop()] if pending else [], len(ids))
        else:
            _decode_rows(loaded, together, None)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        for step, (la, lb) in enumerate(zip(a.logits or [], b.logits or [], strict=False)):
            if not torch.equal(la, lb):
                diff = float((la - lb).abs().max())
                return False, f"prompt {i} step {step}: logits alone and batched differ by up to {diff:.2e}"
        if len(a.logits or []) != len(b.logits or []):
            return False, f"prompt {i}: {len(a.logits or [])} steps alone, {len(b.logits or [])} batched"
    return True, f"{len(ids)} prompts x {steps} steps: logits alone and batched identical"


def _prepared(loader: Loader, max_batch: int = 16) -> Loader:
    """``loader`` followed by ``prepare_model``, so that the cache sizes the model as it will run."""
    def load() -> LoadedModel:
        loaded = loader()
        prepare_model(loaded, max_batch)
        return loaded

    return load


# =========================================================================== decode loops

def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _pad_id(loaded: LoadedModel) -> int:
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        pad = getattr(loaded.model.config, "pad_token_id", None)
    if pad is None:
        pad = loaded.tokenizer.eos_token_id
    return int(pad or 0)


def _keep_active(rows: list[_Row], *tensors: torch.Tensor | None, cache: Any
                 ) -> tuple[list[_Row], list[torch.Tensor | None]]:
    """Drop finished rows from the batch, its tensors and the KV cache."""
    keep = [i for i, r in enumerate(rows) if not r.done]
    if len(keep) == len(rows):
        return rows, list(tensors)
    index = torch.tensor(keep, dtype=torch.long)
    if keep:
        cache.batch_select_indices(index)
    out = [None if t is None else t.index_select(0, index) for t in tensors]
    return [rows[i] for i in keep], out


Joiner = Callable[[int], list[_Row]]


def _prefill(loaded: LoadedModel, rows: list[_Row]) -> tuple[list[_Row], torch.Tensor, torch.Tensor,
                                                              torch.Tensor, Any]:
    """Left-padded prefill of ``rows`` and their first token: (unfinished rows, mask, next positions,
    last tokens, cache), all reduced to the unfinished rows."""
    input_ids, mask = _left_pad([r.prompt_ids for r in rows], _pad_id(loaded))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = loaded.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                       logits_to_keep=1)
    for row, token in zip(rows, _sample_rows(rows, out.logits[:, -1, :]), strict=True):
        row.add(token)
    last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long).unsqueeze(1)
    active, (mask, next_pos, last) = _keep_active(rows, mask, position_ids[:, -1:] + 1, last, cache=out.cache)
    return active, mask, next_pos, last, out.cache  # type: ignore[return-value]


def _left_extend(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _joinable(cache: Any) -> bool:
    """A cache of plain full-attention layers, which rows can be appended to."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _merge_cache(cache: Any, other: Any) -> None:
    """Append ``other``'s rows to ``cache``, left-padding the shorter one with zeros (masked out)."""
    length = max(cache.get_seq_length(), other.get_seq_length())
    for a, b in zip(cache.layers, other.layers, strict=True):
        a.keys = torch.cat([_left_extend(a.keys, length, -2), _left_extend(b.keys, length, -2)])
        a.values = torch.cat([_left_extend(a.values, length, -2), _left_extend(b.values, length, -2)])


def _decode_causal(loaded: LoadedModel, rows: list[_Row], check_cancelled: Callable[[], None] | None,
                   join: Joiner | None = None, max_rows: int = 0) -> None:
    """Left-padded prefill, then one token per step for every unfinished row.

    ``join(free)`` (continuous batching), asked between steps while fewer than ``max_rows`` rows
    run, returns new rows: they are prefilled as a group and appended to the running batch (their
    cache and mask left-padded to a common length). Per-row numbers stay those of the row alone:
    attention reads only each row's real keys, Linear layers are row-invariant (see above).
    """
    rows, mask, next_pos, last, cache = _prefill(loaded, rows)
    while True:
        if join is not None and len(rows) < max_rows and (not rows or _joinable(cache)):
            new = join(max_rows - len(rows))
            if new:
                new, mask2, next2, last2, cache2 = _prefill(loaded, new)
                if new and rows:
                    _merge_cache(cache, cache2)  # same model, same layer types: joinable too
                    width = max(mask.shape[1], mask2.shape[1])
                    mask = torch.cat([_left_extend(mask, width, 1), _left_extend(mask2, width, 1)])
                    next_pos, last, rows = torch.cat([next_pos, next2]), torch.cat([last, last2]), rows + new
                elif new:
                    rows, mask, next_pos, last, cache = new, mask2, next2, last2, cache2
        for row in rows:
            row.stop_if_cancelled()
        rows, (mask, next_pos, last) = _keep_active(rows, mask, next_pos, last, cache=cache)  # type: ignore[assignment]
        if not rows:
            return
        if check_cancelled is not None:
            check_cancelled()
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        out = loaded.model(input_ids=last, attention_mask=mask, position_ids=next_pos, cache=cache,
                           use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1
        for row, token in zip(rows, _sample_rows(rows, out.logits[:, -1, :]), strict=True):
            row.add(token)
        last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long).unsqueeze(1)
        rows, (mask, next_pos, last) = _keep_active(rows, mask, next_pos, last, cache=cache)  # type: ignore[assignment]


def _decoder_start_id(loaded: LoadedModel) -> int:
    config = loaded.model.config
    start = getattr(config, "decoder_start_token_id", None)
    gen_config = getattr(loaded.model, "generation_config", None)
    if start is None and gen_config is not None:
        start = getattr(gen_config, "decoder_start_token_id", None)
    return int(start if start is not None else _pad_id(loaded))


def _decode_seq2seq(loaded: LoadedModel, rows: list[_Row], check_cancelled: Callable[[], None] | None) -> None:
    """Encoder once (right padding, masked), then the decoder one token per step with its cache."""
    model = loaded.model
    input_ids, mask = _right_pad([r.prompt_ids for r in rows], _pad_id(loaded))
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    last = torch.full((len(rows), 1), _decoder_start_id(loaded), dtype=torch.long)
    cache = None
    while True:
        out = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=last, cache=cache,
                    use_cache=True)
        cache = out.cache
        for row, token in zip(rows, _sample_rows(rows, out.logits[:, -1, :]), strict=True):
            row.add(token)
        last = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long).unsqueeze(1)
        for row in rows:
            row.stop_if_cancelled()
        rows, (hidden, mask, last) = _keep_active(rows, hidden, mask, last, cache=cache)
        if not rows:
            return
        if check_cancelled is not None:
            check_cancelled()


def _beam_search(loaded: LoadedModel, row: _Row) -> None:
    """``model.generate`` with beams for one request (beam search needs no per-row sampling)."""
    req = row.request
    ids = torch.tensor([row.prompt_ids], dtype=torch.long)
    stops = sorted(row.stops.ids) or None
    out = loaded.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=req.num_beams, do_sample=False,
        max_new_tokens=req.max_new_tokens, eos_token_id=stops, pad_token_id=_pad_id(loaded), early_stopping=True,
    )
    generated = out[0].tolist()
    if loaded.arch == "causal":
        generated = generated[len(row.prompt_ids):]
    else:
        generated = generated[1:]  # the decoder start token
    pad = _pad_id(loaded)
    while generated and generated[-1] == pad and pad not in row.stops.ids:
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


# =========================================================================== public entry points


def _make_rows(loaded: LoadedModel, requests: Sequence[GenerationRequest],
               prompt_ids: Sequence[list[int]] | None, started: float) -> list[_Row]:
    stops = stop_tokens(loaded)
    rows = []
    for i, req in enumerate(requests):
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {req.max_new_tokens}")
        ids = list(prompt_ids[i]) if prompt_ids is not None else encode_prompt(loaded, req.prompt)
        limit = _max_prompt_tokens(loaded, req.max_new_tokens)
        if limit is not None and len(ids) > limit:
            logger.warning("prompt of %d tokens cut to its last %d (model limit)", len(ids), limit)
            ids = ids[-limit:]
        rows.append(_Row(request=req, prompt_ids=ids, stops=stops, stream=TextStream(loaded.tokenizer, req.on_text),
                         generator=_generator(req.seed), started=started))
    return rows


def _run_rows(loaded: LoadedModel, rows: list[_Row], check_cancelled: Callable[[], None] | None,
              join: Joiner | None = None, max_rows: int = 0) -> None:
    """Decode ``rows`` (sampled ones as one batch, which ``join`` may grow; causal models only),
    then the beam-search ones one by one."""
    prepare_model(loaded, max(max_rows, len(rows)))
    with torch.inference_mode():
        _decode_rows(loaded, rows, check_cancelled, join, max_rows)


def _decode_rows(loaded: LoadedModel, rows: list[_Row], check_cancelled: Callable[[], None] | None,
                 join: Joiner | None = None, max_rows: int = 0) -> None:
    """The decode loops for a model already prepared (inside ``torch.inference_mode``)."""
    sampled = [r for r in rows if r.request.num_beams <= 1]
    if sampled and loaded.arch == "seq2seq":
        _decode_seq2seq(loaded, sampled, check_cancelled)
    elif sampled:
        _decode_causal(loaded, sampled, check_cancelled, join, max_rows)
    for row in rows:
        if row.request.num_beams > 1:
            if check_cancelled is not None:
                check_cancelled()
            _beam_search(loaded, row)


def _run(loaded: LoadedModel, requests: Sequence[GenerationRequest], prompt_ids: Sequence[list[int]] | None,
         check_cancelled: Callable[[], None] | None) -> list[GenerationResult]:
    if not requests:
        return []
    rows = _make_rows(loaded, requests, prompt_ids, time.perf_counter())
    _run_rows(loaded, rows, check_cancelled)
    results = [r.result for r in rows]
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


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
    results: list[GenerationResult | None] = [None] * len(requests)
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
    return results  # type: ignore[return-value]


# =========================================================================== model cache


def model_bytes(loaded: LoadedModel) -> int:
    """Bytes of a model's parameters, buffers and packed weight copies (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(loaded.model.parameters()) + list(loaded.model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total + packed_bytes(loaded.model)


class ModelCache:
    """A thread-safe LRU of loaded models, bounded by count and by parameter bytes.

    ``get`` loads a model once (concurrent callers for the same key wait for the one load) and
    never reloads a cached one. After a load, least recently used models are evicted until both
    bounds hold; the model just loaded always stays, even when it alone exceeds ``max_bytes``.
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None) -> None:
        if max_models < 1:
            raise ValueError("max_models must be >= 1")
        self.max_models, self.max_bytes = max_models, max_bytes
        self._lock = threading.Lock()
        self._models: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = self.misses = self.loads = self.evictions = 0

    def get(self, key: str, loader: Loader) -> LoadedModel:
        """The model cached under ``key``, loaded with ``loader()`` on a miss."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other keys load in parallel
            with self._lock:
                if key in self._models:  # loaded by the thread we waited for
                    self._models.move_to_end(key)
                    self.hits += 1
                    return self._models[key][0]
                self.misses += 1
            loaded = loader()
            size = model_bytes(loaded)
            with self._lock:
                self.loads += 1
                self._models[key] = (loaded, size)
                self._models.move_to_end(key)
                self._evict_over_limits(keep=key)
                self._key_locks.pop(key, None)
            return loaded

    def _total_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def _evict_over_limits(self, keep: str) -> None:
        def over() -> bool:
            too_many = len(self._models) > self.max_models
            too_big = self.max_bytes is not None and self._total_bytes() > self.max_bytes
            return too_many or too_big

        while over() and len(self._models) > 1:
            victim = next(k for k in self._models if k != keep)
            del self._models[victim]
            self.evictions += 1
            logger.info("model cache: evicted %s", victim)

    def evict(self, key: str) -> bool:
        """Forget ``key`` (a model that was deleted or retrained); whether it was cached."""
        with self._lock:
            found = self._models.pop(key, None) is not None
            if found:
                self.evictions += 1
            return found

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._models

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"models": len(self._models), "bytes": self._total_bytes(), "keys": list(self._models),
                    "hits": self.hits, "misses": self.misses, "loads": self.loads, "evictions": self.evictions,
                    "max_models": self.max_models, "max_bytes": self.max_bytes}


# =========================================================================== batching engine


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
    the model took 5.0 s instead of 4.0 s per 48-token reply.
    """

    def __init__(self, cache: ModelCache | None = None, max_batch_size: int = 16, max_wait_ms: float = 10.0,
                 continuous: bool = True, on_busy: Callable[[], None] | None = None) -> None:
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
        self._thread: threading.Thread | None = None
        self._running = False
        self.batches_run = 0
        self.requests_served = 0
        self.batch_sizes: Counter[int] = Counter()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BatchingEngine:
        """Start the engine thread (idempotent)."""
        with self._cond:
            if self._running:
                return self
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="csra-batching-engine", daemon=True)
            self._thread.start()
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
        if self._thread is not None:
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
            self._calls.append((lambda: self.cache.get(model_key, _prepared(loader, self.max_batch_size)), future))
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
        """Block until a call (a model load) or a batch is ready (None when stopping); take it."""
        with self._cond:
            while True:
                if not self._running:
                    return None
                if self._calls:
                    return self._calls.popleft()
                key = self._oldest_key()
                if key is None:
                    self._cond.wait()
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

    def _rows(self, loaded: LoadedModel, pending: list[_Pending]) -> list[_Row]:
        """Decode rows for ``pending``; each resolves its future the moment it finishes."""
        rows = []
        for p in pending:
            try:
                row = _make_rows(loaded, [p.request], None, time.perf_counter())[0]
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                p.future.set_exception(exc)
                continue
            row.on_done = lambda res, p=p, row=row: self._resolve(p, row, res)
            rows.append(row)
        return rows

    @staticmethod
    def _resolve(p: _Pending, row: _Row, res: GenerationResult) -> None:
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
        def join(free: int) -> list[_Row]:
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
            loaded = self.cache.get(key, _prepared(batch[0].loader, self.max_batch_size))
            join = self._joiner(key, loaded, taken) if self.continuous else None
            _run_rows(loaded, self._rows(loaded, batch), self.on_busy, join, self.max_batch_size)
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
