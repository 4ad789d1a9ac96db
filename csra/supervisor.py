"""``csra up``: start every part of a single-machine deployment, keep them running, stop them together.

A part that exits on its own (killed, out of memory, crashed) is restarted with exponential
backoff; its restarts are logged and published to Redis, where ``GET /health`` shows them. Only
Ctrl-C / SIGTERM stops the stack. A restarted Redis keeps its data (AOF), and every other part
reconnects to it on its own.

A hand-written loop rather than supervisord/systemd: those are not installed on every machine
this runs on, and the loop also publishes restart counts for ``/health``.
"""

from __future__ import annotations

import json
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

from csra.presence import SUPERVISOR_KEY
from csra.settings import Settings

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a part that ran this long starts its backoff from the beginning again
PUBLISH_EVERY = 2.0


@dataclass
class Part:
    """One long-running process of the stack and its restart bookkeeping."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None  # when an exited part is due to start again
    last_exit: int | None = None

    def start(self) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, start_new_session=True)
        self.started_at, self.restart_at = time.monotonic(), None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, object]:
        return {"pid": self.proc.pid if self.alive and self.proc else None, "running": self.alive,
                "restarts": self.restarts, "last_exit_code": self.last_exit}


@dataclass
class Supervisor:
    settings: Settings
    parts: list[Part] = field(default_factory=list)
    stopping: bool = False
    _published: float = 0.0

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Part:
        part = Part(name, argv, dict(env or {}))
        part.start()
        self.parts.append(part)
        return part

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM everything (newest first), then SIGKILL whatever is still alive after ``timeout``."""
        self.stopping = True
        for part in reversed(self.parts):
            if part.alive and part.proc is not None:
                logger.info("stopping %s (pid %s)", part.name, part.proc.pid)
                _signal_group(part.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for part in reversed(self.parts):
            if part.proc is None:
                continue
            try:
                part.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", part.name)
                _signal_group(part.proc, signal.SIGKILL)
                part.proc.wait()
        self._withdraw()

    def tick(self) -> None:
        """Restart the parts that exited (each after its backoff); publish the state."""
        now = time.monotonic()
        for part in self.parts:
            if part.alive or self.stopping:
                continue
            if part.restart_at is None:
                part.last_exit = part.proc.returncode if part.proc is not None else None
                if now - part.started_at >= STABLE_AFTER:
                    part.backoff = BACKOFF_FIRST
                part.restart_at = now + part.backoff
                logger.error("%s exited with code %s; restarting it in %.0f s (restart #%d)", part.name,
                             part.last_exit, part.backoff, part.restarts + 1)
                part.backoff = min(part.backoff * 2, BACKOFF_MAX)
            elif now >= part.restart_at:
                if part.proc is not None:
                    _signal_group(part.proc, signal.SIGKILL)  # what the dead part left behind (its pool)
                part.restarts += 1
                part.start()
        if now - self._published >= PUBLISH_EVERY:
            self._published = now
            self._publish()

    def watch(self) -> int:
        """Keep the parts running until Ctrl-C / SIGTERM."""
        while not self.stopping:
            self.tick()
            time.sleep(0.5)
        return 0

    def state(self) -> dict[str, object]:
        return {"pid": os.getpid(), "parts": {p.name: p.status() for p in self.parts}}

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.effective_redis_url, socket_timeout=1, socket_connect_timeout=1)

    def _publish(self) -> None:
        try:
            self._client().set(SUPERVISOR_KEY, json.dumps(self.state()), ex=int(PUBLISH_EVERY * 5))
        except (redis.RedisError, OSError):
            pass  # Redis itself may be the part being restarted; the next tick publishes again

    def _withdraw(self) -> None:
        try:
            self._client().delete(SUPERVISOR_KEY)
        except (redis.RedisError, OSError):
            pass


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
    lines.append("Press Ctrl-C to stop everything (a part that stops on its own is restarted).")
    sys.stderr.write("\n".join(lines) + "\n")


def data_path(settings: Settings, *parts: str) -> Path:
    return settings.data_dir.joinpath(*parts)
