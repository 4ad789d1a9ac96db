"""``csra up``: start every part of a single-machine deployment and stop them together."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from csra.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Supervisor:
    settings: Settings
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stopping: bool = False

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        logger.info("starting %s: %s", name, " ".join(argv))
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, proc))

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM everything (newest first), then SIGKILL whatever is still alive after ``timeout``."""
        self.stopping = True
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                logger.info("stopping %s (pid %s)", name, proc.pid)
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def watch(self) -> int:
        """Block until a part exits on its own (an error) or we are asked to stop."""
        while not self.stopping:
            for name, proc in self.procs:
                code = proc.poll()
                if code is not None:
                    logger.error("%s exited with code %s; stopping everything", name, code)
                    return code or 1
            time.sleep(0.5)
        return 0


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def redis_argv(settings: Settings) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "redis-server is not installed: run `apt-get install redis-server` "
            "(or point CSRA_REDIS_URL at a running Redis)"
        )
    data = settings.data_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    return [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(settings.redis_port),
        "--dir", str(data),
        "--appendonly", "yes",  # queued messages survive a restart of this Redis
        "--save", "60 1",
        "--daemonize", "no",
        "--protected-mode", "yes",
    ]


def wait_for_redis(url: str, timeout: float = 15.0) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline:
                raise SystemExit(f"Redis at {url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.2)


def csra_argv(*args: str) -> list[str]:
    """Run a csra sub-command with the same interpreter (works inside and outside a venv)."""
    return [sys.executable, "-m", "csra.cli", *args]


def up(settings: Settings, with_ui: bool = True, init_models: bool = True) -> int:
    sup = Supervisor(settings)

    def _on_signal(signum: int, _frame: object) -> None:
        sup.stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = {"CSRA_DATA_DIR": str(settings.data_dir)}
    try:
        if not settings.redis_url:
            sup.start("redis", redis_argv(settings))
        wait_for_redis(settings.effective_redis_url)
        env["CSRA_REDIS_URL"] = settings.effective_redis_url
        subprocess.run(csra_argv("migrate"), check=True, env={**os.environ, **env})
        if init_models:  # the default base model: converted once (~20 s), instant afterwards
            subprocess.run(csra_argv("models", "init"), check=True, env={**os.environ, **env})
        sup.start("worker-default", csra_argv("worker", "--queue", "default", "--beat"), env)
        sup.start("worker-train", csra_argv("worker", "--queue", "train"), env)
        sup.start("worker-generate", csra_argv("worker", "--queue", "generate"), env)
        sup.start("api", csra_argv("api"), env)
        if with_ui:
            sup.start("ui", csra_argv("ui"), env)
        _print_urls(settings, with_ui)
        code = sup.watch()
    finally:
        sup.stop()
    return code


def _print_urls(settings: Settings, with_ui: bool) -> None:
    lines = [
        f"csra is up (data in {settings.data_dir})",
        f"  API      {settings.api_url}        docs: {settings.api_url}/docs",
        f"  Redis    {settings.effective_redis_url}",
    ]
    if with_ui:
        lines.append(f"  UI       http://{settings.ui_host}:{settings.ui_port}")
    lines.append("Press Ctrl-C to stop everything.")
    sys.stderr.write("\n".join(lines) + "\n")


def data_path(settings: Settings, *parts: str) -> Path:
    return settings.data_dir.joinpath(*parts)
