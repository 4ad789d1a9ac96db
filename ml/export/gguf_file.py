"""``export_gguf``: one model folder -> one GGUF file, written atomically, described by ``GgufExport``.

See ``ml.export`` for which converter writes the file and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import gguf
import numpy as np

from csra.specs import GgufQuantization
from ml.export import llama
from ml.export.errors import ExportError, UnsupportedArchitecture
from ml.export.source import ExportSource, is_lora_adapter, load_source, read_config
from ml.export.vocab import add_vocab
from ml.inference.llamacpp_build import unusable_reason

logger = logging.getLogger(__name__)

Quantization = GgufQuantization
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)
Progress = Callable[[float, str], None]

# Hugging Face architecture -> GGUF architecture name (the module converting it: ml.export.llama)
SUPPORTED_ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": llama.ARCH_NAME}

_FILE_TYPES: dict[Quantization, gguf.LlamaFileType] = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# written as F16 by gguf, then re-quantized by llama.cpp's quantizer (gguf has no Python quantizer for them)
LLAMA_CPP_QUANTIZED: tuple[Quantization, ...] = ("q4_k_m", "q4_0")
LLAMA_CPP_HINT = ('CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36 '
                  "(it builds llama.cpp from source)")


@dataclass(frozen=True)
class GgufExport:
    """A finished export: where, how big, which quantization, its content hash and architecture."""

    path: Path
    size_bytes: int
    quantization: Quantization
    sha256: str
    architecture: str  # the Hugging Face one, e.g. "LlamaForCausalLM"
    gguf_architecture: str  # llama.cpp's, e.g. "llama"
    lora_merged: bool = False
    seconds: float = 0.0
    tensor_types: dict[str, int] = field(default_factory=dict)  # e.g. {"F32": 61, "Q8_0": 211}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def check_quantization(quantization: str) -> Quantization:
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown GGUF quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def architecture_of(config: dict[str, Any]) -> str:
    """The model's architecture if it can be exported; ``UnsupportedArchitecture`` otherwise."""
    archs = config.get("architectures") or [None]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(arch, SUPPORTED_ARCHITECTURES)
    return str(arch)


# --------------------------------------------------------------------------- writing


def _encode(name: str, data: np.ndarray, quantization: Quantization) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor in the file's type: norms and 1-D tensors F32 (as llama.cpp wants), the rest F16, BF16 or
    Q8_0 (``gguf.quants`` rounds to BF16 as convert_hf_to_gguf does: to nearest even)."""
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quantization == "bf16":
        bf16 = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(data.astype(np.float32), bf16), bf16
    if quantization == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:  # rows not a multiple of Q8_0's block (32): F16, as convert_hf_to_gguf does
            logger.info("%s: row length %d does not fit Q8_0 blocks; kept F16", name, data.shape[-1])
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(source: ExportSource, path: Path, quantization: Literal["f16", "bf16", "q8_0"],
               progress: Progress | None = None) -> None:
    """Write ``source`` as one GGUF file at ``path`` (F16, BF16 or Q8_0 weights), metadata first."""
    writer = gguf.GGUFWriter(path=None, arch=llama.ARCH_NAME)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.name)
    writer.add_file_type(_FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    llama.add_hparams(writer, source.config)
    add_vocab(writer, source.tokenizer, int(source.config["vocab_size"]))
    total = max(len(source.model.state_dict()), 1)
    for i, (name, data) in enumerate(llama.tensors(source.model, source.config)):
        encoded, qtype = _encode(name, data, quantization)
        writer.add_tensor(name, encoded, raw_dtype=qtype)
        if progress is not None:
            progress((i + 1) / total, "converting tensors")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(src: Path, dst: Path, quantization: Quantization) -> None:
    """Re-quantize the F16 GGUF ``src`` into ``dst`` with llama.cpp's quantizer (K-quant recipes)."""
    reason = unusable_reason()
    if reason is not None:
        raise ExportError(f"{quantization} needs llama.cpp's quantizer: {reason}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(_FILE_TYPES[quantization])
    params.nthread = 0  # llama.cpp: all hardware threads
    # llama.cpp prints its per-tensor log to stderr (the process's, not Python's logging)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quantization} (return code {rc})")


# --------------------------------------------------------------------------- reading back


def gguf_metadata(path: Path, arrays: bool = False) -> dict[str, Any]:
    """A GGUF file's key/values (arrays such as the token list only with ``arrays=True``)."""
    reader = gguf.GGUFReader(Path(path))
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or (not arrays and fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY):
            continue
        meta[key] = fld.contents()
    return meta


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds (``{"F32": 61, "Q8_0": 211}``)."""
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(Path(path)).tensors))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --------------------------------------------------------------------------- the export


@contextmanager
def _scratch_paths(out_path: Path, count: int) -> Iterator[list[Path]]:
    """Temporary file names beside ``out_path`` (same file system: the final rename is atomic), removed after."""
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    paths = [out_path.with_name(f".{out_path.name}.tmp-{token}-{i}") for i in range(count)]
    try:
        yield paths
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def export_gguf(
    model_dir: Path,
    out_path: Path,
    quantization: Quantization = "f16",
    progress: Progress | None = None,
    base_model: Path | None = None,
) -> GgufExport:
    """Export the causal LM in ``model_dir`` (a model folder or a LoRA adapter folder) to ``out_path``.

    ``quantization``: ``f16``, ``bf16``, ``q8_0`` (written in Python by ``gguf``), ``q4_k_m`` or ``q4_0`` (an
    F16 file re-quantized by llama.cpp; needs llama-cpp-python). ``progress(fraction, stage)`` is called
    along the way (raising in it aborts the export and leaves nothing behind). ``base_model``: the
    base model folder of a LoRA adapter whose config does not name a local one.
    The file is written beside ``out_path`` under a temporary name and renamed into place.
    """
    started = time.perf_counter()
    quant = check_quantization(quantization)
    config = read_config(Path(model_dir), base_model)
    architecture = architecture_of(config)
    llama.check_config(config)
    requantized = quant in LLAMA_CPP_QUANTIZED
    if requantized and (reason := unusable_reason()) is not None:
        raise ExportError(f"{quant} needs llama.cpp's quantizer (gguf {gguf_version()} has no Python quantizer "
                          f"for it): {reason}. Elsewhere: {LLAMA_CPP_HINT}")

    def report(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(min(max(fraction, 0.0), 1.0), stage)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _scratch_paths(out_path, 2) as (first, second):
        report(0.0, "loading the model")
        source = load_source(Path(model_dir), base_model)
        span = 0.6 if requantized else 0.9
        write_gguf(source, first, "f16" if requantized else quant,  # type: ignore[arg-type]
                   lambda f, stage: report(0.05 + span * f, stage))
        del source
        final = first
        if requantized:
            report(0.7, "quantizing with llama.cpp")
            quantize_with_llama_cpp(first, second, quant)
            final = second
        report(0.96, "hashing")
        digest = file_sha256(final)
        types = tensor_types(final)
        os.replace(final, out_path)
    result = GgufExport(path=out_path, size_bytes=out_path.stat().st_size, quantization=quant, sha256=digest,
                        architecture=architecture, gguf_architecture=SUPPORTED_ARCHITECTURES[architecture],
                        lora_merged=is_lora_adapter(Path(model_dir)),
                        seconds=round(time.perf_counter() - started, 3), tensor_types=types)
    report(1.0, "done")
    logger.info("exported %s to %s (%s, %d bytes)", model_dir, out_path, quant, result.size_bytes)
    return result


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
