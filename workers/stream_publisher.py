"""One thread per process that sends streamed reply pieces to Redis, so the engine thread never waits on it.

The engines call a reply's ``on_text`` on their own thread, between two decode steps, and every
Redis round trip made there is time the decode threads sit idle: with 16 replies streaming through
llama.cpp, the XADDs took a fifth of its engine thread's time (py-spy on the generate worker,
2026-12-03), and a slow Redis would have stalled every chat's decoding. Here the engine thread only
queues the piece; this thread sends what is queued in one pipelined round trip, in the order queued
(each job's pieces keep their order), at most every ``SEND_EVERY``. Measured through the stack (16
chats at once on llama.cpp f16, 64 tokens, 3 runs each, one after the other): 218-229 tokens/s
publishing on the engine thread, 190 with a wake-up of this thread per piece (each took the GIL from
the engine thread), 227-231 sending together at most every 25 ms.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import redis

from csra.redis_conn import get_redis
from csra.streams import publish_text

logger = logging.getLogger(__name__)
SEND_EVERY = 0.025  # seconds between two round trips at least
SYNC_TIMEOUT = 5.0  # how long ``sync`` waits for Redis at most (a stuck Redis must not hold a job forever)
STREAMING_WINDOW = 1.0  # a reply that got text within this many seconds, and has not ended, is streaming


@dataclass(frozen=True)
class Piece:
    job_id: int
    text: str


class StreamPublisher:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Piece | threading.Event] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._urgent = threading.Event()  # someone waits in sync(): send without waiting for SEND_EVERY
        self._thread: threading.Thread | None = None
        self._streaming: dict[int, float] = {}  # job id -> when its reply last got text

    def streaming(self, job_id: int, now: float) -> int:
        """How many replies stream now, ``job_id``'s included (it got text at ``now``)."""
        with self._lock:
            self._streaming[job_id] = now
            if len(self._streaming) > 1:
                # a reply whose job failed without ending its stream drops out after the window
                self._streaming = {j: t for j, t in self._streaming.items() if now - t <= STREAMING_WINDOW}
            return len(self._streaming)

    def ended(self, job_id: int) -> None:
        """``job_id``'s reply streams no more."""
        with self._lock:
            self._streaming.pop(job_id, None)

    def send(self, piece: Piece) -> None:
        """Queue ``piece`` (returns at once)."""
        self._start()
        self._queue.put(piece)

    def sync(self) -> None:
        """Return once every piece queued before this call was sent (waiting SYNC_TIMEOUT at most)."""
        self._start()
        done = threading.Event()
        self._queue.put(done)
        self._urgent.set()
        if not done.wait(SYNC_TIMEOUT):
            logger.warning("streamed pieces not sent within %.0f s (Redis slow or unreachable)", SYNC_TIMEOUT)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="csra-stream-publisher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        sent_at = 0.0
        while True:
            items = [self._queue.get()]
            # at most one round trip every SEND_EVERY: what arrives meanwhile goes together (a wake-up of
            # this thread per piece took the GIL from the engine thread hundreds of times a second);
            # not when a finished reply waits for its last piece (sync)
            self._urgent.wait(max(0.0, sent_at + SEND_EVERY - time.monotonic()))
            self._urgent.clear()
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pieces = [i for i in items if isinstance(i, Piece)]
            if pieces:
                self._send(pieces)
                sent_at = time.monotonic()
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()

    @staticmethod
    def _send(pieces: list[Piece]) -> None:
        try:
            pipe = get_redis().pipeline(transaction=False)
            for piece in pieces:
                publish_text(pipe, piece.job_id, piece.text)
            pipe.execute()
        except (redis.RedisError, OSError):  # the stream is a convenience; the result still has the text
            logger.debug("stream publish failed", exc_info=True)


_publisher = StreamPublisher()


def publisher() -> StreamPublisher:
    """The process's publisher (its thread starts with the first piece)."""
    return _publisher
