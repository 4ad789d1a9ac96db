"""Exporting the shipped all-MiniLM-L6-v2 to ONNX, once per data dir (needs torch: workers, the CLI).

The export is checked against sentence-transformers on a few sentences before it is kept, and
written atomically (a temporary folder renamed into place), so a reader never sees half a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

from ml.memory.embedder import ONNX_FILE, TOKENIZER_FILE, Embedder

logger = logging.getLogger(__name__)

CHECK_SENTENCES = ["I want to cancel my order", "where is my refund?", "hi", "the invoice has the wrong address"]


def export_embedder(source: Path, target: Path) -> Path:
    """``target``/model.onnx + tokenizer.json from the sentence-transformers folder ``source`` (idempotent)."""
    if (target / ONNX_FILE).is_file() and (target / TOKENIZER_FILE).is_file():
        return target
    import torch
    from transformers import AutoModel

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder = AutoModel.from_pretrained(source).eval()

    class Positional(torch.nn.Module):
        """The encoder with positional inputs and one output: what the TorchScript exporter traces cleanly."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    sample[1][1, 5:] = 0  # a padded row, so the trace keeps the masking path
    dynamic = {k: {0: "batch", 1: "tokens"} for k in (*names, "last_hidden_state")}
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter's deprecation and tracer notes; what matters is checked below (_check)
        warnings.simplefilter("ignore")
        torch.onnx.export(Positional().eval(), sample, str(tmp / ONNX_FILE), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=dynamic, dynamo=False, opset_version=17)
    shutil.copy(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    _check(source, tmp)
    if (target / ONNX_FILE).is_file():  # another process finished first: keep its export
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)  # a half-made folder
    try:
        os.replace(tmp, target)
    except OSError:  # another process's export landed in between
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ONNX_FILE).is_file():
            raise
    logger.info("exported the embedding model to %s", target)
    return target


def _check(source: Path, folder: Path) -> None:
    """The ONNX embeddings must equal sentence-transformers' up to float rounding."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(source), device="cpu").encode(CHECK_SENTENCES, normalize_embeddings=True)
    got = Embedder(folder).embed(CHECK_SENTENCES)
    worst = float(np.abs(expected - got).max())
    if worst > 1e-4:
        raise RuntimeError(f"the ONNX export of {source} differs from sentence-transformers by {worst:.2e}")
