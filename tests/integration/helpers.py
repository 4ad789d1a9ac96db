"""Small helpers for integration tests (HTTP against the real stack)."""

from __future__ import annotations

import time
from typing import Any

import httpx


def wait_job(api: httpx.Client, job_id: int, timeout: float = 120, until: set[str] | None = None) -> dict[str, Any]:
    """The job once it is finished (or, with ``until``, in one of those statuses)."""
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/jobs/{job_id}").json()
        if (job["status"] in until) if until else job["finished"]:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.2)


def import_path(api: httpx.Client, path: str, **options: Any) -> dict[str, Any]:
    resp = api.post("/datasets", json={"name": "t", "source": path, "options": options})
    assert resp.status_code == 202, resp.text
    return resp.json()


def upload(api: httpx.Client, filename: str, content: bytes, **data: str) -> httpx.Response:
    return api.post("/datasets", files={"file": (filename, content)}, data=data)
