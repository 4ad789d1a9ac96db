from __future__ import annotations

import pytest
from pydantic import ValidationError

from csra.settings import Settings
from csra.specs import ImportSpec, TrainSpec


def test_defaults_derive_from_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path / "d"))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'd' / 'csra.db'}"
    assert s.api_url == "http://127.0.0.1:8000" and s.ui_port == 7860
    assert s.effective_redis_url == "redis://127.0.0.1:6379/0" and s.max_attempts == 2
    assert s.store_dir == tmp_path / "d" / "models"


def test_bad_settings_fail_fast(monkeypatch):
    monkeypatch.setenv("CSRA_MAX_ATTEMPTS", "0")
    with pytest.raises(ValidationError, match="max_attempts"):
        Settings()
    monkeypatch.delenv("CSRA_MAX_ATTEMPTS")
    monkeypatch.setenv("CSRA_STALE_AFTER_SECONDS", "1")
    with pytest.raises(ValidationError, match="STALE_AFTER"):
        Settings()


def test_train_spec_defaults_are_the_original_best_config():
    spec = TrainSpec(dataset_id=1)
    assert (spec.epochs, spec.learning_rate, spec.batch_size, spec.base_model) == (2, 5e-5, 8, "baseline")


@pytest.mark.parametrize(
    "bad",
    [{"learning_rate": 0}, {"epochs": 0}, {"batch_size": 0}, {"output_name": "../evil"}, {"eval_every": 0},
     {"unknown_field": 1}],
)
def test_train_spec_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        TrainSpec(dataset_id=1, **bad)


def test_import_fractions_must_add_up():
    with pytest.raises(ValidationError, match="add up to 1"):
        ImportSpec(train_fraction=0.8)
