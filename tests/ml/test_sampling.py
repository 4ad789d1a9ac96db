"""Samples are drawn, stratified by intent, never sliced (splits are often stored in intent order)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from csra.jobctx import LocalContext
from csra.specs import ImportSpec, TrainSpec
from ml.importing import import_dataset
from ml.sampling import composition, stratified_sample, stratum_quotas
from ml.training.run import TrainingRun
from models_store.loading import load_model_and_tokenizer
from tests.conftest import BITEXT
from tests.fixtures_models import tiny_causal  # noqa: F401


def sorted_rows(sizes: dict[str, int]) -> list[dict[str, object]]:
    """Rows stored in intent order, as Bitext is."""
    rows: list[dict[str, object]] = []
    for intent, n in sizes.items():
        rows += [{"id": len(rows) + i, "intent": intent, "input": f"{intent} {i}", "output": "reply " * 5,
                  "instruction": "x", "category": "C"} for i in range(n)]
    return rows


def test_quotas_are_proportional_and_exact() -> None:
    quotas = stratum_quotas({"a": 500, "b": 300, "c": 200}, 100)
    assert quotas == {"a": 50, "b": 30, "c": 20}
    odd = stratum_quotas({"a": 7, "b": 7, "c": 7}, 10)
    assert sum(odd.values()) == 10 and max(odd.values()) - min(odd.values()) <= 1
    rare = stratum_quotas({"big": 990, "rare": 10}, 20)  # the rare intent still gets a row
    assert rare == {"big": 19, "rare": 1}
    assert stratum_quotas({"a": 3, "b": 2}, 10) == {"a": 3, "b": 2}


def test_sample_of_sorted_rows_covers_every_intent() -> None:
    rows = sorted_rows({f"intent_{i:02d}": 40 + 3 * i for i in range(27)})
    sample = stratified_sample(rows, len(rows) // 10, seed=42)
    assert len(sample) == len(rows) // 10
    assert set(composition(sample)) == set(composition(rows))
    assert [r["id"] for r in sample] == sorted(r["id"] for r in sample)  # input order kept
    assert sample == stratified_sample(rows, len(rows) // 10, seed=42)  # seeded
    assert sample != stratified_sample(rows, len(rows) // 10, seed=7)
    assert stratified_sample(rows, None, seed=1) == rows


def test_ten_percent_of_the_real_bitext_train_split_covers_its_intents(tmp_path: Path) -> None:
    if not BITEXT.is_file():
        pytest.skip(f"the Bitext development copy is not at {BITEXT}")
    result = import_dataset(BITEXT, ImportSpec(), LocalContext(work_dir=tmp_path), 3, 20)
    train = [r for r in result.rows if r["split"] == "train"]
    sample = stratified_sample(train, len(train) // 10, seed=42)
    split_intents = composition(train)
    assert len(split_intents) == 27
    assert set(composition(sample)) == set(split_intents)
    # proportional: each intent's share of the sample is within one row of its share of the split
    for intent, n in composition(sample).items():
        assert abs(n - split_intents[intent] * len(sample) / len(train)) < 1.5, intent


def test_training_draws_its_rows_instead_of_slicing(tiny_causal: Path, tmp_path: Path) -> None:  # noqa: F811
    rows = sorted_rows({"cancel_order": 60, "change_order": 60, "track_refund": 60, "delete_account": 60})
    spec = TrainSpec(dataset_id=1, max_train_samples=24, max_eval_samples=8, batch_size=4, precision="fp32")
    run = TrainingRun(spec, load_model_and_tokenizer(tiny_causal, for_training=True), rows, rows, tmp_path,
                      LocalContext(work_dir=tmp_path))
    assert Counter(r["intent"] for r in run.train_rows) == {"cancel_order": 6, "change_order": 6,
                                                            "track_refund": 6, "delete_account": 6}
    assert len(set(composition(run.val_rows))) == 4
    assert len(run.train) == 24
