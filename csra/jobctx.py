"""What a job's domain function sees of the job runner.

Domain code (importing, training, evaluation, generation) takes a ``JobContext`` and stays
free of Celery and of the database: it reports progress and events, checks for cancellation
at each step, and raises ``JobError`` with a message a person can act on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class JobError(Exception):
    """A failure the user can fix (bad input, missing model...): its text becomes ``job.error``."""


class TransientJobError(JobError):
    """A failure that may pass by itself (the model store briefly unreachable): the job goes back to
    the queue for another attempt while it has attempts left (``CSRA_MAX_ATTEMPTS``), then fails
    with this text like any ``JobError``."""


class JobCancelled(Exception):
    """Raised by ``check_cancelled`` when the user cancelled the job. A handler that stops with
    something worth keeping (the text of a reply cut short) re-raises it with ``result``."""

    def __init__(self, result: dict[str, Any] | None = None) -> None:
        super().__init__("cancelled")
        self.result = result


class WaitForChildren(Exception):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised by a handler that started child jobs and resumes once they have all ended: its job
    waits without holding a worker and is queued again when the last child ends."""

    def __init__(self, children: list[int]) -> None:
        super().__init__(f"waiting for child jobs {children}")
        self.children = children


class JobTimeLimit(JobError):
    """Raised by ``check_cancelled`` once the job ran past its time limit (the text names the setting)."""


class JobContext(Protocol):
    job_id: int
    work_dir: Path
    attempt: int  # 1 for the first run; a job retried after its worker died runs again as attempt 2...

    def progress(self, fraction: float, stage: str | None = None, eta_seconds: float | None = None) -> None:
        """Record progress in [0, 1] and a short stage text."""

    def event(self, kind: str, message: str = "", **data: Any) -> None:
        """Record a job event: kind is ``log`` or ``metric`` (data: e.g. step, loss, lr)."""

    def check_cancelled(self) -> None:
        """Raise ``JobCancelled`` if the job was cancelled (``JobTimeLimit`` past its time limit); cheap
        enough to call every step."""


@dataclass
class LocalContext:
    """A context for running domain code outside a worker (tests, benchmarks, notebooks)."""

    work_dir: Path
    job_id: int = 0
    attempt: int = 1
    cancel_after_checks: int | None = None
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    progress_log: list[tuple[float, str | None]] = field(default_factory=list)
    _checks: int = 0

    def progress(self, fraction: float, stage: str | None = None, eta_seconds: float | None = None) -> None:
        self.progress_log.append((fraction, stage))

    def event(self, kind: str, message: str = "", **data: Any) -> None:
        self.events.append((kind, message, data))
        if message:
            logger.info("%s: %s", kind, message)

    def check_cancelled(self) -> None:
        self._checks += 1
        if self.cancel_after_checks is not None and self._checks > self.cancel_after_checks:
            raise JobCancelled()
