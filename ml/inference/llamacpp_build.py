"""Which CPU the installed llama.cpp was built for, and whether this CPU can run it.

``make setup`` builds llama-cpp-python from its sdist for the CPU it runs on (``GGML_NATIVE``): on an
AVX-512 machine with bf16 dot products, llama.cpp's bf16 kernels then use them, and a bf16 GGUF decodes
16 replies at once about 1.4x faster than the portable AVX2 build does at f16 (``bench/generate.py
--backends``; README, "torch and llama.cpp side by side"). Machines differ between sessions, so a
native build must never run on a CPU that lacks an instruction it was compiled with (the process would
die on SIGILL, taking every chat of the worker with it). After a build, ``make setup`` records the
build CPU's instruction-set flags in ``$VENV/llama-cpp-built-for.txt`` (``python -m
ml.inference.llamacpp_build stamp``), and rebuilds when they differ from this CPU's (``fits``). At run
time the generate worker and the exporter ask :func:`unusable_reason` before they import llama_cpp
(importing it already runs code compiled for the build CPU): a CPU that lacks a flag of the build
makes llama.cpp unavailable with that reason, and torch keeps serving.

Why read ``/proc/cpuinfo`` rather than a CPU-feature library: the comparison needs exactly the flag
names the kernel reports on the build machine and on this one (a stamp written on one is read on the
other), which is one line of that file; off Linux there is no check (``None``).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

STAMP = "llama-cpp-built-for.txt"
# instruction-set extensions a -march=native build may use (x86: avx*, amx*, sse*, ...; "pni" is SSE3)
_ISA_PREFIXES = ("avx", "amx", "sse", "ssse", "fma", "f16c", "bmi", "pni", "popcnt", "lzcnt", "abm", "movbe")


def isa_flags(cpuinfo: str) -> frozenset[str]:
    """The instruction-set flags of the first ``flags`` line of a ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(f for f in value.split() if f.startswith(_ISA_PREFIXES))
    return frozenset()


@functools.cache  # asked before every llama.cpp job; the CPU does not change under a running process
def this_cpu() -> frozenset[str] | None:
    """This CPU's instruction-set flags; ``None`` where ``/proc/cpuinfo`` cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return isa_flags(text) or None


def stamp_path(prefix: str | None = None) -> Path:
    """Where ``make setup`` records the build CPU: beside the virtualenv that holds llama-cpp-python."""
    return Path(prefix or sys.prefix) / STAMP


def built_for(prefix: str | None = None) -> frozenset[str] | None:
    """The flags llama.cpp was built for (``None``: no record, e.g. a wheel or a portable build)."""
    try:
        return frozenset(stamp_path(prefix).read_text(encoding="utf-8").split())
    except OSError:
        return None


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def missing_flags(build: frozenset[str] | None, cpu: frozenset[str] | None) -> list[str]:
    """Flags of the build this CPU lacks (none where either side is unknown)."""
    if build is None or cpu is None:
        return []
    return sorted(build - cpu)


def unusable_reason(prefix: str | None = None) -> str | None:
    """Why llama.cpp cannot run here, or ``None`` when it can (installed, built for a CPU this one covers)."""
    if not installed():
        return "llama-cpp-python is not installed on this worker (make setup builds it)"
    missing = missing_flags(built_for(prefix), this_cpu())
    if missing:
        return (f"llama.cpp was built for another CPU: this one lacks {', '.join(missing)}; "
                "run `make setup` on this machine to rebuild it for this CPU")
    return None


def native_bf16(prefix: str | None = None) -> bool:
    """Whether llama.cpp here multiplies bf16 weights with the CPU's bf16 dot products (AVX512_BF16):
    built with them (recorded) and this CPU has them. Without them a bf16 GGUF is no faster than f16."""
    build, cpu = built_for(prefix), this_cpu()
    return build is not None and cpu is not None and "avx512_bf16" in build and "avx512_bf16" in cpu


def main(argv: list[str]) -> int:
    """``fits``: exit 0 when the installed llama.cpp was built for exactly this CPU (else 1: rebuild);
    ``stamp``: record this CPU as the build's."""
    command = argv[0] if argv else ""
    if command == "fits":
        build, cpu = built_for(), this_cpu()
        ok = installed() and (cpu is None or build == cpu)
        if not ok:
            sys.stdout.write("llama.cpp: not built for this CPU yet; building it (about 5-7 min on 2 cores)\n")
        return 0 if ok else 1
    if command == "stamp":
        cpu = this_cpu()
        if cpu is not None:
            stamp_path().write_text(" ".join(sorted(cpu)) + "\n", encoding="utf-8")
        return 0
    sys.stderr.write("usage: python -m ml.inference.llamacpp_build fits|stamp\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
