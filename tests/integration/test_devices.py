"""Each torch worker reports its device in ``GET /health`` (real stack: API, Redis, Celery workers)."""

from __future__ import annotations

import torch

from tests.stack import Stack, wait_until


def test_torch_workers_report_their_device_in_health(stack: Stack) -> None:
    def reported() -> bool:
        devices = stack.health().get("devices") or {}
        return any(n.startswith("train@") for n in devices) and any(n.startswith("generate@") for n in devices)

    wait_until(reported, 120, 0.5, what="the train and generate workers' devices in /health")
    health = stack.health()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for name, info in health["devices"].items():
        assert info["setting"] == "auto" and info["device"].startswith(expected), (name, info)
    assert not any(n.startswith("default@") for n in health["devices"])  # no torch there: nothing to report
