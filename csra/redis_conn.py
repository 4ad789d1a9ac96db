"""One Redis client per process for csra's own keys: token streams, worker presence, the
supervisor's state, the batch-invariance reports. (Celery's broker connections are kombu's own.)"""

from __future__ import annotations

from functools import lru_cache

import redis
from kombu.utils.url import maybe_sanitize_url

from csra.settings import get_settings


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    """The process-wide client (a connection pool; reconnects by itself after a Redis restart)."""
    return redis.Redis.from_url(get_settings().effective_redis_url, socket_connect_timeout=1, socket_timeout=5,
                                health_check_interval=30)


def redis_ok() -> bool:
    try:
        return bool(get_redis().ping())
    except (redis.RedisError, OSError):
        return False


def safe_redis_url() -> str:
    """The Redis URL for messages: never with its password."""
    return str(maybe_sanitize_url(get_settings().effective_redis_url))
