"""Model-store names: valid names pass, anything path-like is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from models_store.naming import model_dir, validate_model_name


@pytest.mark.parametrize("name", ["baseline", "ft-12", "SmolLM2.v1_a", "a", "x" * 64])
def test_valid_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "../etc", "a/b", "/abs", "a\\b", ".hidden", "-dash", "x" * 65, "a..b", "sp ace", "ü"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        validate_model_name(name)


def test_model_dir_inside_store(tmp_path: Path) -> None:
    assert model_dir(tmp_path, "baseline") == (tmp_path / "baseline").resolve()
    with pytest.raises(ValueError):
        model_dir(tmp_path, "../outside")


def test_model_dir_refuses_symlink_out_of_store(tmp_path: Path) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    (store / "evil").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside"):
        model_dir(store, "evil")


def test_naming_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, models_store.naming; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
