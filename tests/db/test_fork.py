"""A forked process (a Celery pool process) opens its own database connections, never the parent's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from db import migrate

SCRIPT = textwrap.dedent("""
    import json, os
    from sqlalchemy import text
    from db.session import get_engine, session_scope

    def backend() -> str:
        with session_scope() as s:
            if s.get_bind().dialect.name == "postgresql":
                return str(s.execute(text("SELECT pg_backend_pid()")).scalar())
            return str(id(s.connection().connection.dbapi_connection))

    parent = backend()  # the parent's pool now holds one connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        pooled = get_engine().pool.checkedin()
        os.write(write, json.dumps({"pooled": pooled, "backend": backend()}).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = json.loads(os.read(read, 1000))
    print(json.dumps({"parent": parent, "parent_after": backend(), **child}))
""")


def test_a_forked_process_does_not_reuse_the_parents_connections(url: str, tmp_path: Path) -> None:
    migrate.upgrade(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    env.update(CSRA_DATABASE_URL=url, CSRA_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["pooled"] == 0  # the parent's pooled connection was dropped from the child's pool
    assert seen["parent_after"] == seen["parent"]  # ... and left open for the parent
    if url.startswith("postgresql"):
        assert seen["backend"] != seen["parent"]  # the child's queries ran on a connection of its own
