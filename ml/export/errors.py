"""Why an export cannot be made: errors a person can act on (they become a job's ``error`` text)."""

from __future__ import annotations

from collections.abc import Iterable

from csra.jobctx import JobError


class ExportError(JobError, ValueError):
    """The model (or the request) cannot be exported as asked; the message says why and what to do."""


class UnsupportedArchitecture(ExportError):
    """The model's architecture has no GGUF conversion here."""

    def __init__(self, architecture: str | None, supported: Iterable[str]) -> None:
        self.architecture = architecture
        self.supported = sorted(supported)
        super().__init__(
            f"GGUF export does not support the architecture {architecture!r} "
            f"(supported: {', '.join(self.supported)})"
        )
