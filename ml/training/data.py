"""Training examples and batches: explicit labels, length-grouped batches, dynamic padding.

Prompts come from ``ml.prompting.example_prompt``; the target is the reply plus the template's
end-of-turn token (a reply cut at ``max_target_length`` gets none). Labels are built explicitly so
the end token is learned even when pad == eos (SmolLM2), and the loss covers reply tokens only.
Batches are grouped by length and padded dynamically (right padding, never to a maximum length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from csra.specs import GROUNDING_TEMPLATE, Grounding
from ml.prompting import end_token_ids, example_prompt, has_chat_template, truncate_tokens

IGNORE = -100


@dataclass
class Example:
    """One tokenized training example.

    causal: ``input_ids`` = prompt + reply + end, ``labels`` the same length with IGNORE on the
    prompt. seq2seq: ``input_ids`` = encoder prompt, ``labels`` = reply + eos (decoder targets).
    """

    input_ids: list[int]
    labels: list[int]
    seq2seq: bool = False

    @property
    def length(self) -> int:
        """Tokens the example costs: the sequence (causal) or encoder + decoder (seq2seq)."""
        return len(self.input_ids) + (len(self.labels) if self.seq2seq else 0)


@dataclass
class Batch:
    """A padded batch; for causal LMs also the flat positions where a reply token is predicted."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    target_index: torch.Tensor | None  # causal: flat (b * T + t) indices of hidden states to score
    targets: torch.Tensor  # the token ids to predict, in target_index order (causal) / flat (seq2seq)
    real_tokens: int  # non-padding tokens (encoder + decoder for seq2seq)

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        mask = None if self.attention_mask is None else move(self.attention_mask)
        index = None if self.target_index is None else move(self.target_index)
        return Batch(move(self.input_ids), move(self.labels), mask, index, move(self.targets), self.real_tokens)


class ExampleEncoder:
    """Tokenizes rows into ``Example``s with explicit labels (see the module docstring)."""

    def __init__(self, tokenizer: Any, arch: str, max_input_length: int, max_target_length: int,
                 grounding: Grounding | None = None) -> None:
        self.tokenizer, self.arch, self.grounding = tokenizer, arch, grounding
        self.max_input, self.max_target = max_input_length, max_target_length
        self.chat = has_chat_template(tokenizer)
        self.end_ids = end_token_ids(tokenizer, arch)

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _reply_ids(self, reply: str) -> list[int]:
        """The reply's tokens and the end token; a reply longer than ``max_target`` is cut WITHOUT the
        end token: ending it there would teach the model to stop in mid-reply (on Bitext, 18% of
        replies are longer than 191 tokens, and those fine-tunes wrote shorter, truncated replies)."""
        text = reply if (self.chat or self.arch == "seq2seq") else " " + reply  # after "Agent:"
        ids = self._ids(text, False)
        if len(ids) + len(self.end_ids) <= self.max_target:
            return ids + self.end_ids
        return ids[: self.max_target]

    def _exemplars(self, row: dict[str, Any]) -> list[str]:
        """A grounded example's exemplars (``row["exemplars"]``, chosen as chat and evaluation choose them:
        ``ml.memory.grounding.grounding_exemplars``), each cut to the grounding's token budget."""
        if self.grounding is None:
            return []
        return [truncate_tokens(self.tokenizer, x, self.grounding.max_exemplar_tokens)
                for x in row.get("exemplars", [])[: self.grounding.k]]

    def encode(self, row: dict[str, Any]) -> Example:
        template = self.grounding.template if self.grounding else GROUNDING_TEMPLATE
        prompt = example_prompt(self.tokenizer, row["instruction"], row["input"], self._exemplars(row), template)
        # Chat templates carry their own special tokens; plain prompts get the tokenizer's (BOS, T5's </s>).
        prompt_ids = self._ids(prompt, special=not self.chat or self.arch == "seq2seq")[-self.max_input:]
        reply_ids = self._reply_ids(str(row["output"]))
        if self.arch == "seq2seq":
            return Example(prompt_ids, reply_ids, seq2seq=True)
        return Example(prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids)

    def encode_all(self, rows: Sequence[dict[str, Any]]) -> list[Example]:
        return [self.encode(r) for r in rows]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(examples: Sequence[Example], arch: str, pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch; build the reply-position index."""
    input_ids = _pad([e.input_ids for e in examples], pad_id)
    labels = _pad([e.labels for e in examples], IGNORE)
    if arch == "seq2seq":
        mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
        real = sum(len(e.input_ids) + len(e.labels) for e in examples)
        return Batch(input_ids, labels, mask, None, labels[labels != IGNORE], real)
    # Position t predicts token t + 1; with right padding and a causal mask no real token ever
    # attends to padding, so causal LMs need no attention mask (and SDPA takes its causal fast path).
    next_labels = labels[:, 1:]
    rows, cols = (next_labels != IGNORE).nonzero(as_tuple=True)
    target_index = rows * labels.shape[1] + cols
    real = sum(len(e.input_ids) for e in examples)
    return Batch(input_ids, labels, None, target_index, next_labels[rows, cols], real)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar-length examples (transformers' grouping), in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    order = get_length_grouped_indices(list(lengths), batch_size, generator=gen)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]
