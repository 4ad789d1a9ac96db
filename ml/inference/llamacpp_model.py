"""llama.cpp's side of the llama.cpp engine (``ml.inference.llamacpp``): one loaded GGUF model with its
context, llama.cpp's log routed to Python logging, the readable load error, and the reply decoder (stop
tokens) the engine shares with the torch path. Split from the engine so each module holds one job.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.inference.llamacpp_build import unusable_reason
from ml.inference.tokens import StopTokens, as_ids, stop_tokens, template_stops
from models_store.loading import LoadedModel

logger = logging.getLogger(__name__)
llama_logger = logging.getLogger("llama_cpp")


class LlamaCppLoadError(RuntimeError):
    """A GGUF file that llama.cpp could not load (the message names the file and llama.cpp's reason)."""


@dataclass(frozen=True)
class ReplyDecoder:
    """What turns a reply's token ids into text and which ids end it: csra's HF tokenizer and stop ids.

    Build it once per model (``from_loaded`` or ``from_tokenizer``) and pass it with every request.
    """

    tokenizer: Any
    stops: StopTokens

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> ReplyDecoder:
        """The torch path's own stop tokens (tokenizer, model and generation config eos, end of turn)."""
        return cls(loaded.tokenizer, stop_tokens(loaded))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, arch: str = "causal") -> ReplyDecoder:
        """Without the torch weights (``models_store.loading.load_tokenizer``): eos and the chat template's
        turn tokens."""
        return cls(tokenizer, template_stops(tokenizer, arch, set(as_ids(tokenizer.eos_token_id))))


@dataclass(frozen=True)
class LlamaCppModelInfo:
    """A loaded GGUF model: its file, size and limits."""

    path: str
    description: str
    n_params: int
    size_bytes: int
    n_vocab: int
    n_ctx_train: int
    n_ctx_seq: int  # the longest sequence (prompt + reply) this engine decodes with it


# --------------------------------------------------------------------------- llama.cpp's log


_log_lock = threading.Lock()
_log_installed: list[Any] = []  # the ctypes callback, kept alive while llama.cpp may call it
_capture = threading.local()
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line);
# llama.cpp's INFO lines (one per tensor and setting at each load) go to DEBUG here
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
# the engine itself cuts every sequence at the model's training context, whatever n_ctx the shared cache has
_EXPECTED = ("possible training context overflow",)


def _install_log() -> None:
    """Send llama.cpp's log to the ``llama_cpp`` logger (INFO as DEBUG) instead of stderr, and let a
    model load collect its error lines (llama.cpp only returns NULL; the reason is in its log)."""
    import llama_cpp

    with _log_lock:
        if _log_installed:
            return
        last = [logging.DEBUG]

        def forward(level: int, text: bytes, _user: Any) -> None:
            py_level = last[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)  # 5: continues the last
            last[0] = py_level
            message = text.decode("utf-8", "replace")
            if any(e in message for e in _EXPECTED):
                py_level = logging.DEBUG
            lines = getattr(_capture, "lines", None)
            if lines is not None and py_level >= logging.WARNING:
                lines.append(message.strip())
            if llama_logger.isEnabledFor(py_level):
                llama_logger.log(py_level, "%s", message.rstrip())

        callback = llama_cpp.llama_log_callback(forward)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _log_installed.append(callback)


# --------------------------------------------------------------------------- one loaded model


class _Model:
    """A GGUF model, its one context (``n_seq_max`` sequences, unified KV cache) and its batch buffer.

    Sequence ``n_seq_max`` (one more than the callers') is the prefix cache: it keeps the KV cells of
    the tokens of the last finished reply (``cached``), which the next prompts that start the same way
    (the system prompt, an earlier turn of the conversation) copy instead of computing them again.
    A copy costs nothing in a unified cache: the cells gain a sequence id.
    """

    def __init__(self, path: str, n_ctx: int, n_seq_max: int, n_threads: int) -> None:
        if (reason := unusable_reason()) is not None:  # before the import: it runs the build's code
            raise LlamaCppLoadError(f"cannot load GGUF model {path}: {reason}")
        import llama_cpp

        self.lib = llama_cpp
        self.path = path
        self.model: Any = None
        self.ctx: Any = None
        self.batch: Any = None
        if not Path(path).is_file():
            raise LlamaCppLoadError(f"cannot load GGUF model {path}: no such file")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        _capture.lines = []
        try:
            self.model = llama_cpp.llama_model_load_from_file(path.encode(), params)
            if not self.model:
                raise LlamaCppLoadError(f"llama.cpp could not load GGUF model {path}: {_reason()}")
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
            self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = n_ctx  # every admitted prompt fits one llama_decode (cells are reserved)
            cparams.n_seq_max = n_seq_max + 1  # and the prefix cache
            cparams.n_outputs_max = n_seq_max + 1  # a logits row per sequence and step (at least n_seq_max: llama.cpp)
            cparams.kv_unified = True  # one pool of cells for all sequences, not n_ctx / n_seq_max each
            cparams.n_threads = cparams.n_threads_batch = n_threads
            cparams.no_perf = True
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise LlamaCppLoadError(f"llama.cpp could not create a context for {path}: {_reason()}")
        except BaseException:
            self.close()
            raise
        finally:
            _capture.lines = None
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))
        self.n_ctx_seq = min(int(llama_cpp.llama_n_ctx_seq(self.ctx)), self.n_ctx_train or self.n_ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq_max)  # a prompt token may serve them all
        self.free_seqs = list(range(n_seq_max - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.cache_seq = n_seq_max
        self.cached: list[int] = []  # the tokens whose cells the prefix cache holds, from position 0
        self.info = LlamaCppModelInfo(
            path=path, description=_model_desc(llama_cpp, self.model),
            n_params=int(llama_cpp.llama_model_n_params(self.model)),
            size_bytes=int(llama_cpp.llama_model_size(self.model)), n_vocab=self.n_vocab,
            n_ctx_train=self.n_ctx_train, n_ctx_seq=self.n_ctx_seq)

    def logits(self, index: int) -> np.ndarray:
        """The logits of the ``index``-th token of the last batch (a view of llama.cpp's buffer)."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def decode(self, tokens: Sequence[tuple[int, int, Sequence[int], bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequences, wants logits) entries.

        A token of several sequences (the same prompt prefix) is computed once; its cell belongs to
        each of them. Its attention is that of its first sequence, whose earlier cells hold the same tokens.
        """
        b = self.batch
        for i, (token, pos, seqs, out) in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            for j, seq in enumerate(seqs):
                b.seq_id[i][j] = seq
            b.logits[i] = out
        b.n_tokens = len(tokens)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({_DECODE_ERRORS.get(rc, 'fatal error')}) "
                               f"for a batch of {len(tokens)} tokens of {self.path}")

    def sampler(self, temperature: float, top_p: float, seed: int | None) -> Any:
        """A sampler chain of one sequence: temperature, then top-p on the tempered distribution (csra's
        order), then ``dist`` seeded with ``seed`` (its own RNG: a seeded reply whatever else is batched)."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(float(temperature)))
        if top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(top_p), 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(_seed(seed)))
        return chain

    def sample(self, sampler: Any, index: int) -> int:
        """``sampler``'s token from the logits of the ``index``-th token of the last batch."""
        return int(self.lib.llama_sampler_sample(sampler, self.ctx, index))

    def free_sampler(self, sampler: Any) -> None:
        self.lib.llama_sampler_free(sampler)

    def remove(self, seq: int) -> None:
        """Drop every KV cell of ``seq`` and give its slot back."""
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_seqs.append(seq)

    def share(self, src: int, dst: int, n: int) -> None:
        """Sequence ``dst`` (empty) gets the cells of positions [0, n) of ``src``."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def keep_prefix(self, seq: int, tokens: list[int]) -> None:
        """The prefix cache now holds the cells of ``seq``'s first ``len(tokens)`` positions (``tokens``)."""
        self.drop_prefix()
        self.share(seq, self.cache_seq, len(tokens))
        self.cached = tokens

    def drop_prefix(self) -> None:
        if self.cached:
            self.lib.llama_memory_seq_rm(self.memory, self.cache_seq, -1, -1)
            self.cached = []

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


_DECODE_ERRORS = {1: "no KV cache slot for the batch", 2: "aborted", -1: "invalid input batch"}


def _seed(seed: int | None) -> int:
    """A uint32 seed for llama.cpp's ``dist`` sampler (0xFFFFFFFF would mean "random")."""
    return secrets.randbelow(0xFFFFFFFF) if seed is None else int(seed) % 0xFFFFFFFF


def _reason() -> str:
    lines = [line for line in (getattr(_capture, "lines", None) or []) if line]
    return "; ".join(lines[-3:]) if lines else "no reason given (see the llama_cpp log)"


def _model_desc(lib: Any, model: Any) -> str:
    buf = ctypes.create_string_buffer(256)
    lib.llama_model_desc(model, buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace")


