"""The broker transport against a real redis-server: losing Redis while a message is unacked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from kombu.message import Message
from redis.exceptions import ConnectionError as RedisConnectionError

from csra.broker import Transport
from tests.stack import RedisServer


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _unacked_then_lost(url: str, transport: object) -> tuple[Connection, Message]:
    """A connection whose channel holds an unacked message when Celery's collect() detaches it."""
    conn = Connection(url, transport=transport)
    queue = conn.SimpleQueue("q")
    queue.put({"job": 1})
    message = queue.get(timeout=5)  # delivered, not acked: a running job (acks_late)
    conn._do_close_transport()  # what Connection.collect() leaves behind after a lost broker
    return conn, message


def test_stock_kombu_crashes_on_close_after_collect(redis_url: str):
    """The crash this transport exists for (if kombu fixes it, this fails: drop csra.broker)."""
    conn, _ = _unacked_then_lost(redis_url, "redis")
    with pytest.raises(AttributeError, match="hostname"):
        conn.close()


def test_csra_transport_reports_a_lost_connection_instead(redis_url: str):
    conn, message = _unacked_then_lost(redis_url, Transport)
    conn.close()  # a connection error, which close() ignores: no crash
    # the job finishing later acks on the old channel: a connection error Celery logs, not a crash
    with pytest.raises(RedisConnectionError, match="broker connection was closed"):
        message.ack()


def test_the_celery_app_uses_it_for_redis_urls(monkeypatch: pytest.MonkeyPatch):
    from csra.queue import get_celery
    from csra.settings import get_settings

    for url, expected in (("redis://127.0.0.1:1/0", "csra.broker:Transport"), ("sentinel://h:1", None)):
        monkeypatch.setenv("CSRA_REDIS_URL", url)
        get_settings.cache_clear()
        get_celery.cache_clear()
        assert get_celery().conf.broker_transport == expected
    get_settings.cache_clear()
    get_celery.cache_clear()
