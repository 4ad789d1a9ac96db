"""The estimate's arithmetic on a real, migrated database: truncation, drawn rows, steps, validation
passes, grounding's allowance and the time from a stored measurement (no worker, no calibration)."""

from __future__ import annotations

import pytest

from csra.specs import Grounding, TrainSpec

PROMPT, REPLY = 100, 50  # tokens of every stored example


@pytest.fixture()
def dataset_id(make_client) -> int:  # type: ignore[no-untyped-def]
    make_client()
    from db.models import Dataset, DatasetExample, ThroughputMeasurement
    from db.session import session_scope

    with session_scope() as s:
        ds = Dataset(name="d", source="file:d.csv", status="ready", options={}, row_count=16,
                     stats={"tokens": {"tokenizer": "baseline", "splits": {}}})
        s.add(ds)
        s.flush()
        for split, n in (("train", 10), ("validation", 4), ("test", 2)):
            s.add_all(DatasetExample(dataset_id=ds.id, split=split, instruction="i", input="m", output="r",
                                     prompt_tokens=PROMPT, reply_tokens=REPLY) for _ in range(n))
        s.add(ThroughputMeasurement(base_model="baseline", method="full", precision="bf16", device="cpu",
                                    tokens_per_second=100.0, step_seconds=0.5, source="job", job_id=None))
        return ds.id


def _estimate(**spec: object):  # type: ignore[no-untyped-def]
    from api.services.estimates import estimate_training
    from db.session import session_scope

    with session_scope() as s:
        return estimate_training(s, TrainSpec.model_validate(spec), calibrate=False)


def test_truncation_drawn_rows_steps_and_time(dataset_id: int) -> None:
    est = _estimate(dataset_id=dataset_id, max_input_length=80, max_target_length=40, max_train_samples=5,
                    batch_size=2, epochs=2)
    train, val, test = est.splits["train"], est.splits["validation"], est.splits["test"]
    assert (train.rows, train.rows_used, train.prompt_tokens, train.reply_tokens) == (10, 5, 5 * 80, 5 * 40)
    assert (val.rows_used, val.prompt_tokens, val.reply_tokens) == (4, 4 * 80, 4 * 40)  # all 4 (limit 200)
    assert (test.rows, test.rows_used, test.prompt_tokens) == (2, 0, 0)
    assert (est.steps_per_epoch, est.steps, est.evaluations) == (3, 6, 2)
    assert est.tokens_to_process == 2 * 600 + round(2 * 480 / 3)  # two epochs, two forward-only passes
    assert est.estimated_seconds == pytest.approx(1520 / 100 + 6 * 0.5)
    assert est.throughput is not None and est.throughput.source == "job"
    assert not est.confirm and "6 steps: about 18 s on cpu, bf16" in est.summary


def test_eval_every_and_accumulation(dataset_id: int) -> None:
    est = _estimate(dataset_id=dataset_id, batch_size=1, gradient_accumulation=3, epochs=1.5, eval_every=2)
    assert (est.steps_per_epoch, est.steps, est.evaluations) == (4, 6, 3)  # ceil(10/1/3)=4; 1.5 epochs; 2,4,6


def test_grounded_prompts_get_their_exemplars(dataset_id: int) -> None:
    grounding = Grounding(k=2, max_exemplar_tokens=16)
    est = _estimate(dataset_id=dataset_id, grounding=grounding.model_dump(), max_input_length=250)
    assert est.splits["train"].prompt_tokens == 10 * (PROMPT + 2 * (16 + 4) + 40)  # under the 250 cap


def test_no_measurement_and_no_counts_say_so(dataset_id: int) -> None:
    est = _estimate(dataset_id=dataset_id, method="lora")  # never measured; calibration not asked here
    assert est.estimated_seconds is None and est.confirm and est.throughput is None
    from db.models import DatasetExample
    from db.session import session_scope

    with session_scope() as s:
        s.query(DatasetExample).filter(DatasetExample.split == "train").update({"prompt_tokens": None})
    est = _estimate(dataset_id=dataset_id)
    assert est.tokens_to_process is None and est.estimated_seconds is None and est.confirm
    assert est.note is not None and "import it again" in est.note
