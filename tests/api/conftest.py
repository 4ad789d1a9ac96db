"""In-process API over a real, migrated SQLite database (for checks that need no queue)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient


@pytest.fixture()
def make_client(tmp_path, monkeypatch) -> Iterator:
    from csra.settings import get_settings
    from db import migrate
    from db.session import get_engine, get_sessionmaker

    clients = []

    def make(**env: str) -> TestClient:
        monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("CSRA_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens: reads must still work
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        for f in (get_settings, get_engine, get_sessionmaker):
            f.cache_clear()
        migrate.upgrade()
        from api.main import create_app

        # as a local client talks to it: from loopback, Host 127.0.0.1 (api.guards refuses changes from
        # anywhere else while no API key is set)
        client = TestClient(create_app(), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
    get_engine().dispose()
    from csra.redis_conn import get_redis as redis_client

    for f in (get_settings, get_engine, get_sessionmaker, redis_client):
        f.cache_clear()
