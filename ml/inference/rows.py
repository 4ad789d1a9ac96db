"""The decode state of one request inside a batch, and the next token of every row."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ml.inference.copying import END, Guides
from ml.inference.loops import LoopGuard, repeated_runs
from ml.inference.sampling import new_generator, sample_token
from ml.inference.tokens import StopTokens, TextStream, encode_prompt, max_prompt_tokens, stop_tokens
from ml.inference.types import GenerationRequest, GenerationResult
from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class Row:
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
    peak_batch: int = 1
    copy: Guides | None = field(init=False, default=None)
    loops: LoopGuard = field(init=False)

    def __post_init__(self) -> None:
        if self.request.copy_bias and self.request.guides:
            n = self.request.copy_guides
            self.copy = Guides.build(self.request.guides[:n] if n else self.request.guides)
        n = self.request.no_repeat_ngram_size
        self.loops = LoopGuard(n, repeated_runs(self.request.guides, n) if n >= 2 else frozenset())

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finished(self) -> GenerationResult:
        """The result of a row that has finished (decoding always finishes every row it started)."""
        if self.result is None:
            raise RuntimeError("generation ended without a result for this request")
        return self.result

    def ends_masked(self, generated: Sequence[int]) -> list[int]:
        """The end-token ids a reply ``generated`` so far may not pick yet (``min_new_tokens`` not reached);
        multi-token end sequences are not masked. A reply that has just written the ending of an approved
        answer it follows (a copy guide) may end there, floor or not: the floor keeps a reply from stopping
        early in its own words, and pushing one on past the end of the answer it copies made it loop
        (README, "Two unfinished replies, mended")."""
        if len(generated) >= self.request.min_new_tokens or (self.copy is not None and self.copy.completes(generated)):
            return []
        return sorted(self.stops.every)

    def copied(self, generated: Sequence[int]) -> list[int]:
        """The tokens the copy bias favours after ``generated`` (a guide's end: this row's end tokens)."""
        if self.copy is None:
            return []
        following = self.copy.next_tokens(generated)
        return sorted({t for t in following if t != END} | (self.stops.ids if END in following else set()))

    def steer(self, logits: Any) -> None:
        """Edit this row's logits (a 1-d torch tensor or numpy array, in place) before its token is
        chosen: the copy bias along its guides, then the tokens it may not pick (those that would repeat
        a run of ``no_repeat_ngram_size`` tokens, the end tokens before ``min_new_tokens``). Both engines
        call it, so their replies follow the same rules."""
        boosted = self.copied(self.generated)
        if boosted:
            logits[boosted] += self.request.copy_bias
        masked = self.loops.banned(self.generated) + self.ends_masked(self.generated)
        if masked:
            logits[masked] = float("-inf")

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
            first_token_ms=first, token_ids=list(self.generated), batch_size=self.peak_batch,
        )
        if self.on_done is not None:
            try:
                self.on_done(self.result)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the other rows
                logger.warning("a finished-row callback failed", exc_info=True)


def check_steering(req: GenerationRequest) -> None:
    """The request's length floor, copy bias and loop guard are usable (a ValueError naming the field if not)."""
    if req.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, not {req.min_new_tokens}")
    if not req.copy_bias >= 0:  # also NaN
        raise ValueError(f"copy_bias must be >= 0, not {req.copy_bias}")
    if req.copy_guides < 0:
        raise ValueError(f"copy_guides must be >= 0 (0: every guide), not {req.copy_guides}")
    if req.no_repeat_ngram_size < 0 or req.no_repeat_ngram_size == 1:
        raise ValueError(f"no_repeat_ngram_size must be 0 (off) or at least 2, not {req.no_repeat_ngram_size}")


def sample_rows(rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
    """The next token of each row (greedy rows in one argmax, sampled rows one by one)."""
    logits = logits.float().cpu()  # rows sample with CPU generators: the same seeded text on every device
    for i, row in enumerate(rows):
        row.steer(logits[i])  # this row's own logits only: batch invariance is kept
    tokens = torch.argmax(logits, dim=-1).tolist()
    for i, row in enumerate(rows):
        row.peak_batch = max(row.peak_batch, len(rows))
        if row.logits is not None:
            row.logits.append(logits[i].clone())
        if row.request.temperature > 0:
            tokens[i] = sample_token(logits[i], row.request.temperature, row.request.top_p, row.generator)
    return tokens


def make_rows(loaded: LoadedModel, requests: Sequence[GenerationRequest],
               prompt_ids: Sequence[list[int]] | None, started: float) -> list[Row]:
    stops = stop_tokens(loaded)
    rows = []
    for i, req in enumerate(requests):
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {req.max_new_tokens}")
        check_steering(req)
        ids = list(prompt_ids[i]) if prompt_ids is not None else encode_prompt(loaded, req.prompt)
        limit = max_prompt_tokens(loaded, req.max_new_tokens)
        if limit is not None and len(ids) > limit:
            logger.warning("prompt of %d tokens cut to its last %d (model limit)", len(ids), limit)
            ids = ids[-limit:]
        rows.append(Row(request=req, prompt_ids=ids, stops=stops, stream=TextStream(loaded.tokenizer, req.on_text),
                         generator=new_generator(req.seed), started=started))
    return rows
