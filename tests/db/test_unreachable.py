"""An unreachable database at start: ``csra migrate``, ``csra api`` and ``csra worker`` exit at once
with a message that names CSRA_DATABASE_URL, without its password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import free_port


@pytest.mark.parametrize("command", [["migrate"], ["api"], ["worker", "--queue", "default"]])
def test_an_unreachable_database_stops_the_process_naming_the_setting(command: list[str], tmp_path: Path) -> None:
    url = f"postgresql+psycopg://csra:s3cret-pw@127.0.0.1:{free_port()}/csra"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    env.update(CSRA_DATABASE_URL=url, CSRA_DATA_DIR=str(tmp_path), CSRA_API_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "csra.cli", *command], env=env, capture_output=True, text=True,
                          timeout=60)
    out = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert done.returncode == 2, out
    assert "CSRA_DATABASE_URL=postgresql+psycopg://csra:***@127.0.0.1" in out
    assert "s3cret-pw" not in out


def test_a_sqlite_path_that_cannot_be_made_is_named_too(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    env.update(CSRA_DATABASE_URL=f"sqlite:///{blocker}/sub/csra.db", CSRA_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "csra.cli", "migrate"], env=env, capture_output=True, text=True,
                          timeout=60)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "CSRA_DATABASE_URL=sqlite:///" in out, out
