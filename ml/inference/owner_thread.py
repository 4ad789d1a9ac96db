"""The thread that owns an engine's compute: it ends when the engine is idle, and starts again on new work.

Why it ends: torch's CPU kernels and llama.cpp's ggml both run on OpenMP, and in one process they share
one OpenMP runtime (libgomp). libgomp keeps a pool of threads for every thread that ran a parallel
region, for as long as that thread lives, and once a process holds more OpenMP threads than CPUs it
stops spin-waiting at its barriers and sleeps on a futex instead (its "throttled" spin count). A
decode step has hundreds of barriers. Measured side by side in one run of ``bench/omp_pools.py``
(2-core AMD EPYC, 2026-12-03, SmolLM2-135M, 64 tokens): llama.cpp f16 took 687 ms per reply before
torch ran in the process, 1,269 ms while the thread that had run torch lived, 757 ms once it had
ended; torch took 4,863 ms per reply while llama.cpp's thread lived, 3,190 ms once it had ended.
Threads are cheap to start (tens of microseconds against a reply's hundreds of milliseconds); an idle
pool is not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

IDLE_EXIT_SECONDS = 1.0  # how long an engine thread waits for work before it ends


class OwnerThread:
    """Runs ``target`` on a daemon thread started by ``wake`` when none runs.

    ``target`` returns when it has found no work for ``idle_seconds`` (or the engine stops),
    after calling ``ending`` while holding the engine's lock; ``wake`` too is called holding that
    lock, so work queued after the thread decided to end always finds a thread to run it.
    """

    def __init__(self, name: str, target: Callable[[], None], idle_seconds: float = IDLE_EXIT_SECONDS) -> None:
        self.name, self.target, self.idle_seconds = name, target, idle_seconds
        self._thread: threading.Thread | None = None
        self.starts = 0  # how many threads ran (tests, stats)

    def wake(self) -> None:
        """Start the thread unless one runs (hold the engine's lock)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.target, name=self.name, daemon=True)
            self.starts += 1
            self._thread.start()

    def ending(self) -> None:
        """The running thread ends now (call it from that thread, holding the engine's lock)."""
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None

    def join(self, timeout: float | None) -> None:
        """Wait for the running thread, if any (do not hold the engine's lock)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
