"""Two hosts in one process: two data dirs sharing one database and one file:// model store.

Host A registers (publishes) a model; host B's workers find it through the registry, fetch it
into their own data dir, verified, and load it; deleting it removes it from the store and the
copies. Without ``CSRA_MODEL_STORE_URL`` nothing of this runs.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kombu.asynchronous.timer import Timer
from typer.testing import CliRunner

from models_store import cache
from models_store.remote import MANIFEST, ModelHashMismatch, ModelNotPublished
from tests.fixtures_models import tiny_causal  # noqa: F401

Host = Callable[[str], Path]


@pytest.fixture()
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    from csra.settings import get_settings
    from db import migrate
    from db.session import get_engine, get_sessionmaker

    shared = tmp_path / "shared-store"
    shared.mkdir()
    monkeypatch.setenv("CSRA_DATABASE_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    monkeypatch.setenv("CSRA_MODEL_STORE_URL", f"file://{shared}")
    monkeypatch.setenv("CSRA_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(cache, "_last_prune", 0.0)

    def host(name: str) -> Path:
        """Make the process look like host ``name`` (its own data dir); returns its models folder."""
        monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path / name))
        for f in (get_settings, get_engine, get_sessionmaker):
            f.cache_clear()
        return get_settings().store_dir

    host("a")
    migrate.upgrade()
    yield host
    get_engine().dispose()
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()


def _register(tmp_path: Path, tiny: Path, name: str = "m") -> dict:
    from models_store.registry import register_model

    out = tmp_path / "job-output"
    shutil.copytree(tiny, out)
    return register_model(name, out, kind="finetuned", base_model="tiny")


def test_a_model_trained_on_one_host_is_fetched_and_loaded_on_another(
        hosts: Host, tmp_path: Path, tiny_causal: Path) -> None:  # noqa: F811
    from models_store.loading import load_model_and_tokenizer
    from models_store.registry import find_model_row

    store_a = hosts("a")
    row = _register(tmp_path, tiny_causal)
    assert Path(row["path"]) == store_a / "m"
    assert (tmp_path / "shared-store" / "m" / MANIFEST).is_file()
    assert cache.read_entry(store_a, "m").source == "published"  # type: ignore[union-attr]

    store_b = hosts("b")
    assert not (store_b / "m").exists()
    found = find_model_row("m")
    assert found is not None and Path(found["path"]) == store_b / "m"
    assert find_model_row("m", local=False)["path"] == row["path"]  # type: ignore[index]  # the registry's own
    loaded = load_model_and_tokenizer(Path(found["path"]))
    assert loaded.arch == "causal" and loaded.tokenizer.chat_template


def test_a_tampered_copy_in_the_store_is_never_loaded(hosts: Host, tmp_path: Path,
                                                      tiny_causal: Path) -> None:  # noqa: F811
    from models_store.registry import find_model_row

    hosts("a")
    _register(tmp_path, tiny_causal)
    weights = next((tmp_path / "shared-store" / "m").glob("*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    store_b = hosts("b")
    with pytest.raises(ModelHashMismatch, match="refused"):
        find_model_row("m")
    assert not (store_b / "m").exists()


def test_deleting_a_model_removes_it_from_the_store_and_the_caches(
        hosts: Host, tmp_path: Path, tiny_causal: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from api.services.models import delete_model
    from csra.queue import get_celery
    from db.session import session_scope
    from models_store.registry import find_model_row, local_model_folder, prune_model_copies
    from workers.presence import Presence

    store_a = hosts("a")
    _register(tmp_path, tiny_causal)
    store_b = hosts("b")
    assert find_model_row("m") is not None and (store_b / "m").is_dir()

    hosts("a")
    with session_scope() as s:
        delete_model(s, "m")
    assert not (tmp_path / "shared-store" / "m").exists() and not (store_a / "m").exists()

    hosts("b")
    assert find_model_row("m") is None  # its row is gone: no worker loads it again
    monkeypatch.setattr(cache, "IN_USE_SECONDS", 0.0)
    monkeypatch.setattr(cache, "_last_prune", 0.0)
    threads = set(threading.enumerate())
    worker = SimpleNamespace(hostname="b@test", app=get_celery(), timer=Timer())
    presence = Presence(worker)
    presence.start(worker)  # as a prefork worker on every queue starts
    # its parent process starts no thread of ours: a thread busy at a fork leaves the pool process its
    # locks (an import hung for good); the prune runs on the worker's timer, in the forking thread
    assert set(threading.enumerate()) == threads
    (prune,) = [s.entry for s in worker.timer.queue if s.entry.fun.__wrapped__ is prune_model_copies]
    prune()  # what the timer runs about every minute (and each model lookup runs too)
    presence.stop(worker)
    assert not (store_b / "m").exists() and cache.entries(store_b) == []
    with pytest.raises(ModelNotPublished, match="not in the model store"):  # nor could it be fetched again
        local_model_folder("m", None, "")


def test_without_a_store_url_nothing_changes(hosts: Host, tmp_path: Path, tiny_causal: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from models_store.registry import find_model_row

    monkeypatch.delenv("CSRA_MODEL_STORE_URL")
    store_a = hosts("a")
    row = _register(tmp_path, tiny_causal)
    assert find_model_row("m")["path"] == row["path"] == str(store_a / "m")  # type: ignore[index]
    assert not (store_a / cache.CACHE_DIR).exists() and not any((tmp_path / "shared-store").iterdir())


def test_a_process_exits_at_start_when_the_store_is_unreachable(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from csra.cli import app
    from csra.settings import get_settings

    monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CSRA_MODEL_STORE_URL", f"file://{tmp_path}/not-mounted")
    get_settings.cache_clear()
    try:
        for args in (["worker", "--queue", "train"], ["models", "init", "--tiny"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, result.output
            assert "CSRA_MODEL_STORE_URL" in result.output and "unreachable" in result.output
    finally:
        get_settings.cache_clear()
