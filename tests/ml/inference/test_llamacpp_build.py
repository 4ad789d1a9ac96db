"""The llama.cpp build is checked against the CPU it runs on (``ml.inference.llamacpp_build``), and the generate
worker serves through torch, with the reason, when it does not fit; bf16 exports are served only where
llama.cpp multiplies them with the CPU's bf16 dot products."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csra.jobctx import JobError
from csra.settings import get_settings
from csra.specs import GenerateSpec
from ml.inference import llamacpp_build
from ml.inference.llamacpp_build import isa_flags, missing_flags, this_cpu, unusable_reason
from workers.handlers import generation

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512_bf16 hypervisor
processor\t: 1
flags\t\t: fpu sse
"""


def test_the_instruction_set_flags_of_the_first_cpu_are_read() -> None:
    assert isa_flags(CPUINFO) == {"sse", "sse2", "pni", "ssse3", "fma", "sse4_1", "sse4_2", "avx", "f16c", "avx2",
                                  "bmi2", "avx512f", "avx512_bf16"}  # not fpu, vme, hypervisor
    assert isa_flags("no flags here") == frozenset()


def test_missing_flags_are_those_of_the_build_this_cpu_lacks() -> None:
    build = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert missing_flags(build, frozenset({"avx2"})) == ["avx512_bf16", "avx512f"]
    assert missing_flags(build, build | {"amx_tile"}) == []  # a newer CPU runs an older build
    assert missing_flags(None, frozenset({"avx2"})) == []  # no record (a wheel, a portable build): trusted
    assert missing_flags(build, None) == []  # no /proc/cpuinfo: nothing to compare


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A virtualenv prefix of our own, so the stamp written or read is not the real one."""
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    return tmp_path


needs_linux = pytest.mark.skipif(this_cpu() is None, reason="needs /proc/cpuinfo")


@needs_linux
def test_a_build_for_another_cpu_is_refused_with_the_flags_it_lacks(prefix: Path) -> None:
    cpu = this_cpu()
    assert cpu is not None
    (prefix / llamacpp_build.STAMP).write_text(" ".join(sorted(cpu | {"avx10_2", "amx_fp8"})))
    reason = unusable_reason()
    if not llamacpp_build.installed():
        assert reason is not None and "not installed" in reason
        return
    assert reason is not None
    assert "lacks amx_fp8, avx10_2" in reason and "make setup" in reason
    (prefix / llamacpp_build.STAMP).write_text(" ".join(sorted(cpu)))
    assert unusable_reason() is None


@needs_linux
def test_make_setup_stamps_the_build_and_rebuilds_on_another_cpu(prefix: Path) -> None:
    if not llamacpp_build.installed():
        pytest.skip("llama-cpp-python is not installed")
    assert llamacpp_build.main(["fits"]) == 1  # no record: make setup builds (again) for this CPU
    assert llamacpp_build.main(["stamp"]) == 0
    assert llamacpp_build.built_for() == this_cpu()
    assert llamacpp_build.main(["fits"]) == 0
    (prefix / llamacpp_build.STAMP).write_text("avx2 sse")  # the venv was built on an older CPU
    assert llamacpp_build.main(["fits"]) == 1
    assert llamacpp_build.main(["nonsense"]) == 2


@needs_linux
def test_bf16_is_native_only_where_the_build_and_the_cpu_both_have_it(prefix: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = prefix / llamacpp_build.STAMP
    with_bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(llamacpp_build, "this_cpu", lambda: with_bf16)
    stamp.write_text("avx2 avx512f avx512_bf16")
    assert llamacpp_build.native_bf16()
    stamp.write_text("avx2 fma f16c")  # a portable build on a bf16 CPU: no bf16 kernels
    assert not llamacpp_build.native_bf16()
    stamp.unlink()
    assert not llamacpp_build.native_bf16()


# --------------------------------------------------------------------------- the generate worker's choice


@pytest.fixture
def model_row(tmp_path: Path) -> dict[str, object]:
    folder = tmp_path / "store" / "my-ft"
    (folder / "exports").mkdir(parents=True)
    for quant in ("bf16", "f16"):
        (folder / "exports" / f"my-ft-{quant}.gguf").write_bytes(b"GGUF")
    return {"name": "my-ft", "path": str(folder), "content_hash": None}


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_auto_serves_torch_with_the_reason_when_llama_cpp_does_not_fit(
        model_row: dict[str, object], monkeypatch: pytest.MonkeyPatch, fresh_settings: None,
        caplog: pytest.LogCaptureFixture) -> None:
    reason = "llama.cpp was built for another CPU: this one lacks avx512f; run `make setup` on this machine"
    monkeypatch.setattr(generation, "unusable_reason", lambda: reason)
    assert generation.choose_backend(GenerateSpec(message="hi", backend="auto"), model_row) == ("torch", None)
    assert "lacks avx512f" in caplog.text
    with pytest.raises(JobError, match="cannot run on this generate worker: llama.cpp was built for another CPU"):
        generation.choose_backend(GenerateSpec(message="hi", backend="llamacpp"), model_row)


def test_bf16_is_served_first_only_where_it_is_native(model_row: dict[str, object], monkeypatch: pytest.MonkeyPatch,
                                                      fresh_settings: None) -> None:
    monkeypatch.setattr(generation, "unusable_reason", lambda: None)
    exports = Path(str(model_row["path"])) / "exports"
    monkeypatch.setattr(generation, "native_bf16", lambda: True)
    assert generation.choose_backend(GenerateSpec(message="hi"), model_row) == ("llamacpp", exports / "my-ft-bf16.gguf")
    monkeypatch.setattr(generation, "native_bf16", lambda: False)
    assert generation.choose_backend(GenerateSpec(message="hi"), model_row) == ("llamacpp", exports / "my-ft-f16.gguf")
    # asked for by name, it is served anyway
    assert generation.choose_backend(GenerateSpec(message="hi", backend="llamacpp:bf16"), model_row) == (
        "llamacpp", exports / "my-ft-bf16.gguf")
