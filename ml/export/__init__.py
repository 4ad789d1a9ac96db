"""Exporting a model of the store to a single GGUF file (llama.cpp, Ollama, LM Studio).

``export_gguf(model_dir, out_path, quantization)`` turns a csra model folder (a ``save_pretrained``
causal LM with its tokenizer; or a peft LoRA adapter folder, merged into its base first) into one
GGUF file whose metadata carries the tokenizer's chat template (``tokenizer.chat_template``), so a
llama.cpp-based runtime renders a conversation exactly as ``ml.prompting`` does.

Which converter, and why: the GGUF file is written by the PyPI ``gguf`` package (the writer
maintained inside llama.cpp: ``GGUFWriter``, its constants, ``TensorNameMap``, ``SpecialVocab``,
``gguf.quants``), never by hand. llama.cpp's own ``convert_hf_to_gguf.py`` is not published on
PyPI and reads tokenizer files from disk rather than the tokenizer object csra prompts with, so the
few parts of it an architecture needs (Llama's q/k permutation, the hyper-parameter keys, the
BPE vocabulary with token types and merges) are followed here for the supported architectures
(``ml.export.llama``). ``f16`` and ``q8_0`` are produced in Python (``gguf.quants`` quantizes
Q8_0); ``gguf.quants`` has no quantizer for the K-quants (Q4_K, Q6_K), so ``q4_k_m`` is an f16
file re-quantized by llama.cpp's own quantizer through llama-cpp-python
(``llama_cpp.llama_model_quantize``), the reference implementation of that recipe.

Domain code: no Celery, database or HTTP; a worker handler passes ``progress`` to report.
"""

from ml.export.gguf_file import (
    QUANTIZATIONS,
    SUPPORTED_ARCHITECTURES,
    GgufExport,
    Quantization,
    UnsupportedArchitecture,
    export_gguf,
    gguf_metadata,
)

__all__ = [
    "QUANTIZATIONS",
    "SUPPORTED_ARCHITECTURES",
    "GgufExport",
    "Quantization",
    "UnsupportedArchitecture",
    "export_gguf",
    "gguf_metadata",
]
