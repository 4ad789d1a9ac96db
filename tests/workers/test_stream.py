"""A generation's token stream (workers.handlers.generation._Stream) against a real redis-server:
the first piece goes out at once, later pieces go out together, and nothing is lost or reordered.
Pieces are sent by the process's publisher thread (workers.stream_publisher): the engine thread that
calls ``on_text`` never waits on Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csra.redis_conn import get_redis
from csra.settings import get_settings
from csra.streams import decode_entry, stream_key
from tests.stack import RedisServer


@pytest.fixture()
def redis_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    monkeypatch.setenv("CSRA_REDIS_URL", server.url)
    monkeypatch.setenv("CSRA_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    get_redis.cache_clear()
    from workers.stream_publisher import publisher

    monkeypatch.setattr(publisher(), "_streaming", {})  # no reply of another test counts as streaming
    try:
        yield
    finally:
        get_settings.cache_clear()
        get_redis.cache_clear()
        server.stop()


def _published(job_id: int) -> list[str]:
    from workers.stream_publisher import publisher

    publisher().sync()  # what was queued so far has been sent
    return [decode_entry(f)["text"] for _, f in get_redis().xrange(stream_key(job_id))]


def _stream(every_ms: float, monkeypatch: pytest.MonkeyPatch, job_id: int):  # type: ignore[no-untyped-def]
    from workers.handlers.generation import _Stream

    monkeypatch.setenv("CSRA_GEN_STREAM_EVERY_MS", str(every_ms))
    get_settings.cache_clear()
    return _Stream(job_id)


def test_pieces_decoded_close_together_are_published_together(redis_env, monkeypatch):
    stream = _stream(200, monkeypatch, 1)
    pieces = [f"w{i} " for i in range(20)]
    for p in pieces:
        stream.on_text(p)
    assert _published(1) == ["w0 "]  # the first piece at once (time to first token), the rest held
    time.sleep(0.25)
    stream.on_text("late ")  # past the interval: everything held goes out with it
    assert _published(1) == ["w0 ", "".join(pieces[1:]) + "late "]
    stream.on_text("tail")
    stream.flush()  # the reply is done: nothing stays held
    assert "".join(_published(1)) == stream.text == "".join(pieces) + "late tail"
    stream.flush()
    assert len(_published(1)) == 3  # flushing twice publishes nothing more


def test_every_piece_goes_out_when_the_interval_is_zero(redis_env, monkeypatch):
    stream = _stream(0, monkeypatch, 2)
    for p in ("a", "b", "c"):
        stream.on_text(p)
    assert _published(2) == ["a", "b", "c"]


def test_a_stopped_stream_publishes_nothing_more(redis_env, monkeypatch):
    stream = _stream(1000, monkeypatch, 3)
    stream.on_text("first ")
    stream.on_text("held")
    stream.stop()
    stream.flush()
    stream.on_text("after")
    assert _published(3) == ["first "]


def test_the_engine_thread_does_not_wait_on_redis(redis_env, monkeypatch):
    stream = _stream(0, monkeypatch, 4)
    get_redis().execute_command("CLIENT", "PAUSE", 1000, "ALL")  # Redis answers no one for a second
    started = time.monotonic()
    for p in ("a", "b", "c"):
        stream.on_text(p)  # what the engine thread calls between two decode steps
    assert time.monotonic() - started < 0.5
    assert _published(4) == ["a", "b", "c"]  # sent once Redis answers, in order


def test_pieces_queued_before_a_stop_never_follow_it(redis_env, monkeypatch):
    stream = _stream(0, monkeypatch, 5)
    get_redis().execute_command("CLIENT", "PAUSE", 500, "ALL")
    stream.on_text("queued")  # waits in the publisher's queue while Redis is paused
    stream.stop()  # returns once what was queued is sent: the runner writes the end marker next
    stream.on_text("after")  # a step that was already running: not published
    get_redis().xadd(stream_key(5), {"type": "end", "status": "cancelled"})
    stream.flush()
    time.sleep(0.1)
    assert [decode_entry(f)["type"] for _, f in get_redis().xrange(stream_key(5))] == ["token", "end"]


def test_a_finished_reply_does_not_wait_for_the_next_send(redis_env, monkeypatch):
    from workers import stream_publisher

    monkeypatch.setattr(stream_publisher, "SEND_EVERY", 30.0)  # pieces wait this long for the next round trip
    stream = _stream(0, monkeypatch, 6)
    stream.on_text("a")
    assert _published(6) == ["a"]  # "a" went out (sync): the next round trip is 30 s away
    stream.on_text("b")
    started = time.monotonic()
    stream.flush()  # the reply is done: its last pieces go now, not 30 s later
    assert time.monotonic() - started < 5
    assert "".join(_published(6)) == "ab"


def test_replies_streaming_at_once_share_the_updates_per_second(redis_env, monkeypatch):
    from workers.handlers.generation import _Stream

    monkeypatch.setenv("CSRA_GEN_STREAM_UPDATES_PER_SECOND", "10")  # two replies at once: each every 0.2 s
    a, b = _stream(0, monkeypatch, 7), _Stream(8)
    a.on_text("a1 ")
    b.on_text("b1 ")  # first pieces go out at once (time to first token)
    a.on_text("a2 ")
    b.on_text("b2 ")  # held: two replies stream, so each gets 5 updates a second
    assert (_published(7), _published(8)) == (["a1 "], ["b1 "])
    time.sleep(0.25)
    a.on_text("a3 ")
    assert _published(7) == ["a1 ", "a2 a3 "]
    b.flush()  # b's reply is done: a streams alone, each piece at once (CSRA_GEN_STREAM_EVERY_MS 0)
    a.on_text("a4 ")
    assert _published(7) == ["a1 ", "a2 a3 ", "a4 "]
    a.flush()
    assert "".join(_published(8)) == b.text == "b1 b2 "


def test_a_reply_that_stopped_getting_text_no_longer_counts(redis_env, monkeypatch):
    from workers import stream_publisher
    from workers.handlers.generation import _Stream

    monkeypatch.setattr(stream_publisher, "STREAMING_WINDOW", 0.1)
    monkeypatch.setenv("CSRA_GEN_STREAM_UPDATES_PER_SECOND", "10")
    gone, a = _stream(0, monkeypatch, 9), _Stream(10)
    gone.on_text("x")  # a reply whose job failed: it never flushes
    a.on_text("a1 ")
    time.sleep(0.15)  # past the window: a streams alone
    a.on_text("a2 ")
    assert _published(10) == ["a1 ", "a2 "]  # counted with the other, a2 would wait until 0.2 s after a1
