"""Prompt tokens, end-of-reply tokens, and incremental detokenization of a streamed reply."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ml.prompting import end_token_ids, has_chat_template, turn_marker_ids
from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopTokens:
    """Token ids that end a reply: ``ids`` its end (eos, the end of turn: where a copied guide ends too),
    multi-token end sequences (rare templates), and ``turns``, the chat template's other turn markers
    (``<|im_start|>``: a model that writes one has begun the next turn)."""

    ids: frozenset[int]
    sequences: tuple[tuple[int, ...], ...] = ()
    turns: frozenset[int] = frozenset()

    @property
    def every(self) -> frozenset[int]:
        """Every single id that ends a reply (``ids`` and ``turns``)."""
        return self.ids | self.turns

    def match(self, generated: Sequence[int]) -> int:
        """How many trailing tokens of ``generated`` form an end marker (0: none)."""
        if generated and generated[-1] in self.every:
            return 1
        for seq in self.sequences:
            if len(generated) >= len(seq) and tuple(generated[-len(seq):]) == seq:
                return len(seq)
        return 0


def as_ids(value: Any) -> list[int]:
    """A config's ``eos_token_id`` (one id, a list of them, or None) as a list of ids."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_tokens(loaded: LoadedModel) -> StopTokens:
    """eos (tokenizer, model config, generation config) and the chat template's turn tokens."""
    ids = set(as_ids(loaded.tokenizer.eos_token_id))
    ids.update(as_ids(getattr(loaded.model.config, "eos_token_id", None)))
    gen_config = getattr(loaded.model, "generation_config", None)
    ids.update(as_ids(getattr(gen_config, "eos_token_id", None)))
    return template_stops(loaded.tokenizer, loaded.arch, ids)


def template_stops(tokenizer: Any, arch: str, eos: set[int]) -> StopTokens:
    """``eos`` plus the chat template's end of turn (one id, or a multi-token sequence) and its turn
    markers (``ml.prompting.turn_marker_ids``): a reply that writes ``<|im_start|>`` has ended too."""
    ids = set(eos)
    end = end_token_ids(tokenizer, arch)
    sequences: tuple[tuple[int, ...], ...] = ()
    if len(end) == 1:
        ids.add(end[0])
    elif len(end) > 1:
        sequences = (tuple(end),)
    turns = frozenset(turn_marker_ids(tokenizer, arch)) - ids
    return StopTokens(frozenset(int(i) for i in ids), sequences, turns)


def encode_prompt(loaded: LoadedModel, prompt: str) -> list[int]:
    """Prompt token ids, tokenized exactly as training does (``ml.training.data.ExampleEncoder``)."""
    return encode_prompt_with(loaded.tokenizer, loaded.arch, prompt)


def encode_prompt_with(tokenizer: Any, arch: str, prompt: str) -> list[int]:
    """``encode_prompt`` from the tokenizer alone (llama.cpp serves the weights).

    Chat templates carry their own special tokens; plain prompts (and T5's encoder) get the
    tokenizer's (BOS, ``</s>``).
    """
    chat = has_chat_template(tokenizer)
    special = not chat or arch == "seq2seq"
    ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    if not ids:
        fallback = tokenizer.bos_token_id
        if fallback is None:
            fallback = tokenizer.eos_token_id
        ids = [fallback]
    return list(ids)


def max_prompt_tokens(loaded: LoadedModel, max_new_tokens: int) -> int | None:
    """The longest prompt a causal LM can take with ``max_new_tokens`` after it (None: no limit)."""
    if loaded.arch != "causal":
        return None
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    return prompt_budget(int(limit) if limit else None, max_new_tokens)


def prompt_budget(context_tokens: int | None, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves room for ``max_new_tokens`` in ``context_tokens`` (None: no limit)."""
    return max(context_tokens - max_new_tokens, 1) if context_tokens else None




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
