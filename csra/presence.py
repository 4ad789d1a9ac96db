"""Worker presence in Redis, so ``GET /health`` can list live workers per queue in one read.

Celery's broadcast ``inspect`` waits for replies and misses a busy worker on a loaded 2-core
machine; a key with a TTL that each worker refreshes (``workers.presence``) is exact and
instant to read.
"""

from __future__ import annotations

import json

import redis

PREFIX = "csra:worker:"
INTERVAL = 2.0
TTL = 10


def announce(client: redis.Redis, hostname: str, queues: list[str]) -> None:
    client.set(PREFIX + hostname, json.dumps({"queues": queues}), ex=TTL)


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
