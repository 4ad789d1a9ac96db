"""The Redis transport Celery uses, with one fix: a detached channel reports a lost connection.

When Celery 5.7 (kombu 5.7) loses the broker it first ``collect()``s the connection, which detaches
the transport (``transport.client = None``), and then ``close()``s it. If a channel still holds an
unacknowledged message by then (a job that is running: tasks are acked late), closing it tries to
restore that message through the detached transport and kombu raises ``AttributeError: 'NoneType'
object has no attribute 'hostname'``. That is not one of the transport's connection errors, so
Celery treats it as unrecoverable and the worker process exits: a Redis restart in the middle of
a training run took the worker down with it, and nothing restarted it (kombu #582 is the same
crash on an older path). Here the detached channel raises redis-py's ``ConnectionError`` instead,
which every caller on these paths already handles as the lost connection it is: Celery reconnects,
the running job keeps running (its row and heartbeat are the source of truth, not the message),
and a late ack on the old channel is logged and dropped (the claim drops a redelivered finished job).

Subclassing keeps the rest of kombu's transport as it is; remove this once kombu guards it itself.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

# the broker URL schemes this transport serves (others, e.g. sentinel://, keep kombu's own)
SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection was closed (Redis went away)")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel
