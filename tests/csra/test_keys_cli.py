"""``csra keys`` on a fresh data dir (a real, migrated SQLite database)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from csra.cli import app


@pytest.fixture()
def run(tmp_path, monkeypatch):
    from csra.settings import get_settings
    from db.session import get_engine, get_sessionmaker

    monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CSRA_API_KEY", raising=False)
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, ["keys", *args])
    get_engine().dispose()
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()


def test_create_prints_the_key_once_and_stores_only_its_hash(run, tmp_path):
    made = run("create", "--name", "alice", "--role", "agent")
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[0]
    assert secret.startswith("csra_") and len(secret) > 40
    assert "keys are off" in made.stderr  # no CSRA_API_KEY here: the API checks no key yet
    assert secret.encode() not in (tmp_path / "data" / "csra.db").read_bytes()
    listed = run("list")
    assert "alice" in listed.stdout and "agent" in listed.stdout and secret not in listed.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (("create", "--name", "bob", "--role", "root"), "unknown role 'root'"),
    (("create", "--name", "bad name"), "invalid key name"),
    (("create", "--name", "admin"), "bootstrap key"),
    (("revoke", "nobody"), "no key named 'nobody'"),
])
def test_bad_requests_say_what_is_wrong(run, args, needle):
    result = run(*args)
    assert result.exit_code == 1 and needle in result.stderr, result.output


def test_names_are_unique_and_revoking_twice_is_refused(run):
    assert run("create", "--name", "carol").exit_code == 0
    again = run("create", "--name", "carol")
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert run("revoke", "carol").exit_code == 0
    twice = run("revoke", "carol")
    assert twice.exit_code == 1 and "already revoked" in twice.stderr
    assert "carol" not in run("list").stdout and "carol" in run("list", "--all").stdout
