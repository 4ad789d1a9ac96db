"""Batch-invariance reports of processes that are gone leave ``GET /health`` (against a real redis-server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import redis

from csra.presence import forget_invariance_of_dead, invariance_reports, report_invariance
from tests.stack import RedisServer
from workers.presence import pid_alive

FAILED = {"batch_invariant": False, "detail": "logits differ"}
PASSED = {"batch_invariant": True, "detail": "identical"}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pid_alive_tells_a_running_process_from_a_finished_one() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)  # init: another user's process where tests run unprivileged, alive either way
    assert not pid_alive(_dead_pid())


def test_a_dead_workers_reports_are_forgotten_and_the_living_ones_kept(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        host, dead = socket.gethostname(), _dead_pid()
        report_invariance(client, f"{host}:{dead}", "baseline", FAILED)  # a worker restarted since
        report_invariance(client, f"{host}:{dead}", "tuned", PASSED)
        report_invariance(client, f"{host}:{os.getpid()}", "baseline", PASSED)  # the running one
        report_invariance(client, f"elsewhere:{dead}", "baseline", PASSED)  # another host's: not ours to judge

        gone = forget_invariance_of_dead(client, host, pid_alive)

        assert sorted(gone) == [f"{host}:{dead}|baseline", f"{host}:{dead}|tuned"]
        assert invariance_reports(client) == {f"{host}:{os.getpid()}|baseline": PASSED,
                                              f"elsewhere:{dead}|baseline": PASSED}
        assert forget_invariance_of_dead(client, host, pid_alive) == []  # nothing left to clear
    finally:
        server.stop()


def test_a_failed_check_is_a_health_warning_naming_its_model_and_worker(tmp_path: Path, monkeypatch) -> None:
    from api.routes.health import _invariance
    from csra.presence import report_parts
    from csra.redis_conn import get_redis
    from csra.settings import get_settings

    assert report_parts("vm:12|tiny-llama") == ("vm:12", "tiny-llama")
    server = RedisServer(tmp_path / "redis")
    server.start()
    monkeypatch.setenv("CSRA_REDIS_URL", server.url)
    get_settings.cache_clear()
    get_redis.cache_clear()
    try:
        report_invariance(get_redis(), "vm:12", "tiny-llama", FAILED)
        report_invariance(get_redis(), "vm:13", "baseline", PASSED)
        summary, warnings = _invariance()
        assert set(summary) == {"vm:12|tiny-llama", "vm:13|baseline"}
        assert warnings == ["batch invariance is OFF for model tiny-llama on worker vm:12: greedy replies may "
                            "differ between a request alone and in a batch (logits differ)"]
    finally:
        get_settings.cache_clear()
        get_redis.cache_clear()
        server.stop()
