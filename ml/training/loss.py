"""The training loss: cross-entropy over reply tokens, the output layer only where it is needed."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ml.training.data import IGNORE, Batch


def _plain_lm_head(base: Any) -> bool:
    """Whether logits are just ``lm_head(hidden)`` (no soft-capping or scaling we would skip)."""
    cfg = base.config
    return all(getattr(cfg, k, None) in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))


class LossFn:
    """Summed cross-entropy over reply tokens of a batch.

    Causal LMs: the transformer body gives hidden states; only the hidden states at reply
    positions go through ``lm_head`` (the full-vocabulary projection dominates a small model's
    cost otherwise). Encoder-decoder models: every decoder position is a reply token already.
    """

    def __init__(self, model: Any, arch: str) -> None:
        self.model, self.arch = model, arch
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body = getattr(base, base.base_model_prefix, None)
        self.head = base.get_output_embeddings()
        self.fast = arch == "causal" and self.body is not None and self.head is not None and _plain_lm_head(base)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.arch == "seq2seq":
            return self._seq2seq(batch)
        if self.fast and self.body is not None and self.head is not None:
            hidden = self.body(input_ids=batch.input_ids, use_cache=False).last_hidden_state
            logits = self.head(hidden.flatten(0, 1).index_select(0, batch.target_index))
        else:  # e.g. soft-capped logits: let the model compute them, then keep the reply positions
            logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
            logits = logits.flatten(0, 1).index_select(0, batch.target_index)
        return F.cross_entropy(logits.float(), batch.targets, reduction="sum")

    def _seq2seq(self, batch: Batch) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder_input_ids = base._shift_right(batch.labels)  # pads -100 and prepends the start token
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         decoder_input_ids=decoder_input_ids, use_cache=False)
        return F.cross_entropy(out.logits.flatten(0, 1).float(), batch.labels.flatten(),
                               ignore_index=IGNORE, reduction="sum")
