"""Batch invariance is verified on the machine that runs, never assumed (workers/invariance.py).

The kernels' row-count behaviour depends on the CPU (MKL dispatches by vendor), so these tests
check the path production selects *here*, that the self-check agrees with an exhaustive check for
every candidate, and that a deliberately non-invariant path is reported as such.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ml.inference.invariance import (
    CANDIDATES,
    MKL_BLOCKS,
    LinearPlan,
    apply_linear_plan,
    check_linear_rows,
    linear_plan_of,
    select_linear_plan,
)
from ml.inference.selfcheck import prepare_model, verify_model
from models_store.loading import load_model_and_tokenizer
from tests.fixtures_models import tiny_causal, tiny_seq2seq  # noqa: F401
from tests.ml.inference.test_generation import lively

SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]


def smollm2_linears() -> torch.nn.Module:
    """One Linear of each of SmolLM2-135M's shapes (the output layer has no bias)."""
    torch.manual_seed(0)
    return torch.nn.ModuleList([torch.nn.Linear(i, o, bias=o != 49152) for i, o in SMOLLM2_SHAPES]).eval()


def exhaustive_row_invariance(layers: torch.nn.Module, max_rows: int = 40) -> list[str]:
    """Every row count 1..max_rows and rows at every position, against each row computed alone."""
    failures = []
    torch.manual_seed(1)
    with torch.inference_mode():
        for layer in layers:
            x = torch.randn(max_rows, layer.in_features)
            alone = torch.cat([layer(x[i: i + 1]) for i in range(max_rows)])
            for rows in range(1, max_rows + 1):
                if not torch.equal(layer(x[:rows]), alone[:rows]):
                    failures.append(f"{layer.in_features}x{layer.out_features} at {rows} rows")
    return failures


def row_count_dependent(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A deliberately non-invariant kernel: its result moves in the last bits with the row count."""
    rows = x.numel() // x.shape[-1]
    return torch.nn.functional.linear(x, self.weight, self.bias) * (1.0 + 1e-6 * (rows > 1))


NOT_INVARIANT = LinearPlan("row-count-dependent", row_count_dependent)


# --------------------------------------------------------------------------- kernels


def test_the_plan_production_selects_here_is_row_invariant() -> None:
    layers = smollm2_linears()
    plan, tries = select_linear_plan(layers, max_batch=16)
    assert tries[-1]["plan"] == plan.name and tries[-1]["invariant"], tries
    assert linear_plan_of(layers) == plan.name
    assert exhaustive_row_invariance(layers) == []


@pytest.mark.parametrize("plan", [p for p in CANDIDATES if p.available()], ids=lambda p: p.name)
def test_the_self_check_agrees_with_an_exhaustive_check(plan: LinearPlan) -> None:
    layers = smollm2_linears()
    apply_linear_plan(layers, plan)
    verdict = check_linear_rows(layers, max_batch=16).invariant
    assert verdict == (exhaustive_row_invariance(layers) == [])


def test_a_non_invariant_kernel_is_reported_and_the_next_candidate_taken() -> None:
    layers = smollm2_linears()
    check = check_linear_rows(layers, 16)  # stock nn.Linear before any plan: just a sanity run
    assert check.checked > 0
    apply_linear_plan(layers, NOT_INVARIANT)
    bad = check_linear_rows(layers, 16)
    assert not bad.invariant and "at 2 rows" in bad.failures[0]
    plan, tries = select_linear_plan(layers, 16, candidates=[NOT_INVARIANT, MKL_BLOCKS])
    assert plan is MKL_BLOCKS and [t["invariant"] for t in tries] == [False, True]
    plan, tries = select_linear_plan(layers, 16, candidates=[NOT_INVARIANT])
    assert plan is NOT_INVARIANT and tries == [tries[0]] and not tries[0]["invariant"]


def test_a_weight_changed_after_packing_is_not_served_stale() -> None:
    layer = torch.nn.Linear(64, 32).eval()
    apply_linear_plan(layer, CANDIDATES[0] if CANDIDATES[0].available() else MKL_BLOCKS)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


# --------------------------------------------------------------------------- the model-level self-check


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_models_are_verified_invariant_when_prepared(arch: str, tiny_causal: Path,  # noqa: F811
                                                     tiny_seq2seq: Path) -> None:  # noqa: F811
    loaded = lively(load_model_and_tokenizer(tiny_causal if arch == "causal" else tiny_seq2seq))
    report = prepare_model(loaded)
    assert report["batch_invariant"], report
    assert report["attention"] == "csra_rowwise" and report["linear_plan"] == linear_plan_of(loaded.model)
    assert "identical" in report["detail"] and report["cpu"]
    assert prepare_model(loaded) is report  # once per model


def test_a_non_invariant_path_makes_the_model_report_it(tiny_causal: Path,  # noqa: F811
                                                        caplog: pytest.LogCaptureFixture) -> None:
    loaded = lively(load_model_and_tokenizer(tiny_causal))
    with caplog.at_level("ERROR"):
        report = prepare_model(loaded, candidates=[NOT_INVARIANT])
    assert not report["batch_invariant"]
    assert report["linear_plan"] == "row-count-dependent"
    assert "no Linear plan is row-invariant" in report["detail"] and "differ" in report["detail"]
    assert "BATCH INVARIANCE IS OFF" in caplog.text
    same, detail = verify_model(loaded)  # the end-to-end check alone catches it too
    assert not same and "logits alone and batched differ" in detail


def test_a_non_invariant_attention_is_caught_end_to_end(tiny_causal: Path) -> None:  # noqa: F811
    """Plain SDPA over left-padded keys reduces over the padding too: caught by the model-level check."""
    loaded = lively(load_model_and_tokenizer(tiny_causal))
    prepare_model(loaded)
    loaded.model.set_attn_implementation("eager")
    same, detail = verify_model(loaded)
    assert not same and "differ" in detail


# --------------------------------------------------------------------------- MKL's Intel code path

INTEL_SHIM = "int mkl_serv_intel_cpu_true(void) { return 1; }\nint mkl_serv_intel_cpu(void) { return 1; }\n"
UNDER_INTEL_PATH = textwrap.dedent("""
    import json, torch
    from tests.ml.inference.test_invariance import exhaustive_row_invariance, smollm2_linears
    from ml.inference.invariance import MKL_BLOCKS, apply_linear_plan, select_linear_plan

    def pad4(self, x):  # the plan csra used before: MKL on a multiple of 4 rows (assumed, never checked)
        rows = x.shape[0]; padded = -(-rows // 4) * 4
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])]) if padded != rows else x
        return torch.nn.functional.linear(x, self.weight, self.bias)[:rows]

    layers = smollm2_linears()
    from ml.inference.invariance import LinearPlan
    apply_linear_plan(layers, LinearPlan("pad4", pad4))
    old = exhaustive_row_invariance(layers, 24)
    apply_linear_plan(layers, MKL_BLOCKS)
    blocks = exhaustive_row_invariance(layers, 24)
    plan, tries = select_linear_plan(layers, 16)
    print(json.dumps({"old": old, "blocks": blocks, "plan": plan.name, "selected_ok": tries[-1]["invariant"],
                      "selected_exhaustive": exhaustive_row_invariance(layers, 24)}))
""")


def _has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512(), reason="MKL's Intel AVX-512 path needs a CPU with AVX-512")
def test_on_mkls_intel_avx512_path(tmp_path: Path) -> None:
    """MKL runs other kernels on Intel CPUs. On an AMD CPU with AVX-512, a two-line shim makes MKL take
    its Intel path (on an Intel CPU it changes nothing), reproducing what an Intel Xeon does: the old
    "multiple of 4 rows" plan breaks at 16 rows there; mkl-blocks and the selected plan do not."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "a C compiler is needed (Debian: gcc)"
    (tmp_path / "shim.c").write_text(INTEL_SHIM)
    shim = tmp_path / "libintelpath.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c")], check=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "MKL_VERBOSE": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", UNDER_INTEL_PATH], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[3], timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AVX-512" in out.stdout.splitlines()[0]  # MKL says which code path it runs
    import json

    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert any("at 16 rows" in f for f in found["old"]), found["old"]  # the failure seen on an Intel Xeon
    assert found["blocks"] == []
    assert found["selected_ok"] and found["selected_exhaustive"] == []
