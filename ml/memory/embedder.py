"""Sentence embeddings of all-MiniLM-L6-v2 (the model the project ships offline), run by ONNX Runtime.

The same three steps as sentence-transformers' pipeline for this model (``modules.json``): the
BERT encoder, mean pooling over real tokens, L2 normalisation. ONNX Runtime rather than torch so
that the API process (which never imports torch) can embed a search query; the tokenizer is the
``tokenizers`` library's (Rust), from the model's own ``tokenizer.json``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length
# Replies are embedded from their first 128 tokens: what the model was trained on (its card), and
# about half the work on Bitext's long replies (a 9,460-reply split: minutes on two cores, not ten)
REPLY_TOKENS = 128
DIM = 384


class EmbedderMissing(RuntimeError):
    """The ONNX export of the embedding model is not there yet (``ml.memory.export``)."""


class Embedder:
    """``embed(texts)`` -> float32 (n, 384), unit length: cosine similarity is a dot product."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        if not (folder / ONNX_FILE).is_file() or not (folder / TOKENIZER_FILE).is_file():
            raise EmbedderMissing(f"no exported embedding model in {folder}")
        options = ort.SessionOptions()
        # no busy-waiting after a run: the embedder runs just before a reply is decoded, in the same
        # process, and spinning threads would take the cores from the decode (2 cores here)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding()
        self._lock = threading.Lock()  # tokenizers' padding/truncation state is per object

    def embed(self, texts: list[str], batch_size: int = 64, max_tokens: int = MAX_TOKENS) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        # batches of similar lengths pad less (what sentence-transformers does too); results go back in order
        order = np.argsort([len(t) for t in texts], kind="stable")
        done = np.concatenate([self._batch([texts[j] for j in order[i: i + batch_size]], max_tokens)
                               for i in range(0, len(texts), batch_size)])
        out = np.empty_like(done)
        out[order] = done
        return out

    def embed_replies(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts, max_tokens=REPLY_TOKENS)

    def _batch(self, texts: list[str], max_tokens: int) -> np.ndarray:
        with self._lock:
            self.tokenizer.enable_truncation(max_tokens)
            encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (hidden,) = self.session.run(["last_hidden_state"],
                                     {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
