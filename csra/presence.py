"""Worker presence in Redis, so ``GET /health`` can list live workers per queue in one read.

Celery's broadcast ``inspect`` waits for replies and misses a busy worker on a loaded 2-core
machine; a key with a TTL that each worker refreshes (``workers.presence``) is exact and
instant to read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

PREFIX = "csra:worker:"
INVARIANCE_KEY = "csra:invariance"
SUPERVISOR_KEY = "csra:supervisor"  # ``csra up``'s parts and their restarts
INVARIANCE_TTL = 24 * 3600
INTERVAL = 2.0
TTL = 10


def announce(client: redis.Redis, hostname: str, queues: list[str], device: dict[str, Any] | None = None) -> None:
    """Refresh this worker's presence; ``device``: where it runs torch (``ml.device.describe``), once known."""
    body: dict[str, Any] = {"queues": queues}
    if device is not None:
        body["device"] = device
    client.set(PREFIX + hostname, json.dumps(body), ex=TTL)


def withdraw(client: redis.Redis, hostname: str) -> None:
    client.delete(PREFIX + hostname)


def live_workers(client: redis.Redis, queues: tuple[str, ...]) -> dict[str, list[str]]:
    per_queue: dict[str, list[str]] = {q: [] for q in queues}
    for key in client.scan_iter(match=PREFIX + "*", count=200):
        raw = client.get(key)
        if raw is None:
            continue
        name = key.decode()[len(PREFIX):]
        for q in json.loads(raw).get("queues", []):
            per_queue.setdefault(q, []).append(name)
    return per_queue


def worker_devices(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Each live worker that reported one -> its torch device (``{"device": "cuda:0", "bf16": true, ...}``)."""
    found: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(match=PREFIX + "*", count=200):
        raw = client.get(key)
        if raw is None:
            continue
        device = json.loads(raw).get("device")
        if device is not None:
            found[key.decode()[len(PREFIX):]] = device
    return found


def report_parts(key: str) -> tuple[str, str]:
    """A report's ``"worker|model"`` key (``report_invariance``) as (worker, model)."""
    worker, _, model = key.partition("|")
    return worker, model


def report_invariance(client: redis.Redis, worker: str, model: str, report: dict[str, Any]) -> None:
    """Publish a model's batch-invariance self-check (``ml.inference.invariance``) for ``GET /health``."""
    pipe = client.pipeline()
    pipe.hset(INVARIANCE_KEY, f"{worker}|{model}", json.dumps(report))
    pipe.expire(INVARIANCE_KEY, INVARIANCE_TTL)
    pipe.execute()


def forget_invariance_of_dead(client: redis.Redis, host: str, alive: Callable[[int], bool]) -> list[str]:
    """Remove the self-check reports of ``host``'s processes that are gone (``alive(pid)`` false); the
    removed ``"host:pid|model"`` keys.

    A report is keyed by the process that loaded the model (``host:pid``), and every restart of a worker
    (``csra up`` restarts a dead one; each ``csra up`` starts new ones) gives it a new pid: without this,
    ``GET /health`` went on listing the reports of processes that no longer exist, and the warning of a
    failed check outlived the worker that failed it. Only a process on the same host can tell whether
    a pid is alive, so each worker clears its own host's (``workers.presence``)."""
    gone = []
    raw_keys: list[bytes] = client.hkeys(INVARIANCE_KEY)  # type: ignore[assignment]  # sync client
    for raw in raw_keys:
        key = raw.decode()
        name, _, pid = report_parts(key)[0].rpartition(":")
        if name == host and pid.isdigit() and not alive(int(pid)):
            gone.append(key)
    if gone:
        client.hdel(INVARIANCE_KEY, *gone)
    return gone


def invariance_reports(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """``"worker|model"`` -> its latest self-check report (those of the last day)."""
    raw: dict[bytes, bytes] = client.hgetall(INVARIANCE_KEY)  # type: ignore[assignment]  # sync client
    return {k.decode(): json.loads(v) for k, v in raw.items()}
