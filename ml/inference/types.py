"""What a caller asks the generator for, and what it gets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from csra.specs import REPLY_TOKENS
from models_store.loading import LoadedModel

Loader = Callable[[], LoadedModel]


@dataclass
class GenerationRequest:
    """One prompt to complete, with its own decoding settings.

    ``prompt`` is already rendered (``ml.prompting.render_prompt``). ``min_new_tokens``: the reply
    cannot end (its end tokens are masked) before it has this many tokens; ``max_new_tokens`` still
    cuts it. ``guides`` (token ids of approved answers) with ``copy_bias`` > 0 nudge each step toward
    the tokens that continue the reply along a guide (``ml.inference.copying``); ``copy_guides`` n > 0: along
    the first n guides only (the others still allow their repeats to the loop guard). ``no_repeat_ngram_size``
    n > 0: the reply may not repeat a run of n tokens it already holds unless a guide repeats it too
    (``ml.inference.loops``; 0: off).
    ``temperature`` 0 means
    greedy; ``seed`` makes sampling reproducible (None: a fresh random seed). ``num_beams`` > 1 uses
    beam search through ``model.generate`` (one request at a time, no streaming of partial text:
    ``on_text`` then gets the whole reply at once). ``on_text`` receives each new piece of decoded
    text; the pieces concatenate to ``GenerationResult.text``. ``should_stop`` is asked before every
    decode step: once it answers True the row leaves the batch at that step and finishes as
    "cancelled" with the text streamed so far.
    """

    prompt: str
    max_new_tokens: int = REPLY_TOKENS
    min_new_tokens: int = 0
    guides: tuple[tuple[int, ...], ...] = ()
    copy_bias: float = 0.0
    copy_guides: int = 0
    no_repeat_ngram_size: int = 0
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
    ``batch_size``: the largest batch this row was decoded in (1: it ran alone).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: float
    first_token_ms: float | None
    token_ids: list[int] = field(default_factory=list, repr=False)
    batch_size: int = 1  # the most rows decoded together with this one in a step
