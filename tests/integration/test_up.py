"""`csra up` brings up Redis, migrations, workers and the API; SIGTERM stops all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil

from tests.stack import free_port, wait_until


def test_csra_up_starts_everything_and_stops_cleanly(tmp_path):
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    env.update(CSRA_DATA_DIR=str(tmp_path / "var"), CSRA_API_PORT=str(api_port), CSRA_REDIS_PORT=str(redis_port),
               CSRA_TORCH_THREADS="1")
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "csra.cli", "up", "--no-ui", "--skip-model-init"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                h = httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return h["status"] == "ok" and all(h["workers"][q] for q in ("default", "train", "generate"))

        wait_until(ready, 120, 0.5, "csra up")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 5  # redis, three workers (and their pools), the API
        assert (tmp_path / "var" / "csra.db").is_file() and (tmp_path / "var" / "redis").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after csra up stopped: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        print((tmp_path / "up.log").read_text()[-3000:])  # noqa: T201 - the log, for a failing run
