"""Token streams of generation jobs, in Redis Streams (workers write, the API relays as SSE).

A stream (unlike pub/sub) keeps what was written, so a reader that connects late still gets
every token from the start. Each stream expires an hour after its job ends.
"""

from __future__ import annotations

import redis
from redis.typing import EncodableT, FieldT

MAXLEN = 20_000
EXPIRE_SECONDS = 3600


def stream_key(job_id: int) -> str:
    return f"csra:stream:{job_id}"


def publish_start(client: redis.Redis, job_id: int, attempt: int) -> None:
    """An attempt begins: a retried job (its worker died) streams its reply again from the start."""
    client.xadd(stream_key(job_id), {"type": "start", "attempt": str(attempt)}, maxlen=MAXLEN, approximate=True)


def publish_text(client: redis.Redis, job_id: int, delta: str) -> None:
    client.xadd(stream_key(job_id), {"type": "token", "text": delta}, maxlen=MAXLEN, approximate=True)


def publish_end(client: redis.Redis, job_id: int, status: str, error: str | None = None) -> None:
    key = stream_key(job_id)
    fields: dict[FieldT, EncodableT] = {"type": "end", "status": status}
    if error:
        fields["error"] = error
    pipe = client.pipeline()
    pipe.xadd(key, fields, maxlen=MAXLEN, approximate=True)
    pipe.expire(key, EXPIRE_SECONDS)
    pipe.execute()


def decode_entry(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}
