"""Evaluation predictions are checkpointed per batch: a retried job generates only what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from csra.specs import EvaluateSpec
from tests.fixtures_models import tiny_causal  # noqa: F401
from workers.handlers.evaluation import _predict


class Crash(Exception):
    """Stands for the worker being killed mid-model."""


class Ctx:
    """A JobContext that records progress and can crash after some batches."""

    def __init__(self, crash_after_batches: int | None = None) -> None:
        self.job_id, self.work_dir = 1, Path(".")
        self.stages: list[str] = []
        self.logs: list[str] = []
        self.crash_after = crash_after_batches

    def progress(self, fraction: float, stage: str | None = None, eta_seconds: float | None = None) -> None:
        self.stages.append(stage or "")

    def event(self, kind: str, message: str = "", **data: Any) -> None:
        self.logs.append(message)

    def check_cancelled(self) -> None:
        if self.crash_after is not None and len(self.stages) >= self.crash_after:
            raise Crash()


EXAMPLES = [{"id": 100 + i, "instruction": "Answer the customer.", "input": f"where is my order number {i}?"}
            for i in range(10)]
SPEC = EvaluateSpec(model_ids=["tiny"], dataset_id=1, max_new_tokens=6, batch_size=3)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_retried_model_resumes_from_its_checkpoint(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    row = {"path": str(tiny_causal), "name": "tiny"}
    _, whole, _, _ = _predict(row, EXAMPLES, SPEC, Ctx(), 0, 10)

    checkpoint = tmp_path / "predictions-tiny.partial.jsonl"
    with pytest.raises(Crash):
        _predict(row, EXAMPLES, SPEC, Ctx(crash_after_batches=2), 0, 10, checkpoint)
    assert len(checkpoint.read_text().splitlines()) == 2  # two batches of 3 were saved
    with checkpoint.open("a") as f:
        f.write('{"wall": 1.0, "results": [{"exam')  # the crash tore the third batch's line

    ctx = Ctx()
    _, resumed, wall, _ = _predict(row, EXAMPLES, SPEC, ctx, 0, 10, checkpoint)
    assert any("6 predictions kept" in m for m in ctx.logs)
    assert ctx.stages[0] == "tiny: generated 9/10"  # only the 4 missing examples were generated
    assert [r.token_ids for r in resumed] == [r.token_ids for r in whole]
    assert [r.text for r in resumed] == [r.text for r in whole]
    assert wall > 0


def test_a_checkpoint_for_other_examples_is_ignored(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    row = {"path": str(tiny_causal), "name": "tiny"}
    checkpoint = tmp_path / "predictions-tiny.partial.jsonl"
    with pytest.raises(Crash):
        _predict(row, EXAMPLES, SPEC, Ctx(crash_after_batches=1), 0, 10, checkpoint)
    others = [{**e, "id": e["id"] + 1000} for e in EXAMPLES]
    ctx = Ctx()
    _, results, _, _ = _predict(row, others, SPEC, ctx, 0, 10, checkpoint)
    assert len(results) == 10 and not any("kept" in m for m in ctx.logs)
    assert ctx.stages[0] == "tiny: generated 3/10"
