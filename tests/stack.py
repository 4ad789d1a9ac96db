"""Real services for integration tests: a redis-server and csra processes on free loopback ports.

Nothing here is mocked: the tests talk HTTP to a real uvicorn, which enqueues to a real Redis,
from which real Celery worker processes take the jobs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, persist: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if persist else "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except (redis.RedisError, OSError):
                return False

        wait_until(up, 15, what="redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def wipe(self) -> None:
        """Forget everything (a Redis restarted without its data)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)


def postgres_bin_dir() -> Path | None:
    """Where the PostgreSQL server binaries are: Debian keeps them in /usr/lib/postgresql/<version>/bin
    (off PATH); the newest version there wins, else whatever ``initdb`` is on PATH."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"[0-9]+", d.parent.name))

    if found:
        return max(found, key=version)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL server: its own data directory (a fresh temp dir), 127.0.0.1 on a free
    port, its unix socket inside the data dir, fsync off. PostgreSQL refuses to run as root, so as root
    the server runs as the ``postgres`` system user (Debian's package creates it); else as this user.

    ``url`` is the SQLAlchemy URL of ``database`` (created by ``start``); ``url_for(name)`` and
    ``create_database(name)`` give more databases on the same server.
    """

    database: str = "csra"
    port: int = field(default_factory=free_port)
    user: str = "csra"  # the superuser initdb creates (trust auth on loopback only)
    settings: dict[str, str] = field(default_factory=dict)  # extra ``-c name=value`` server settings
    root: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, and there is no 'postgres' user to run PostgreSQL as "
                               "(apt-get install postgresql creates it)") from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": str(self.root), "USER": "postgres", "LOGNAME": "postgres"}}

    def start(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("the PostgreSQL server is not installed (apt-get install postgresql, or make system)")
        self.root = Path(tempfile.mkdtemp(prefix="csra-pg-"))  # not under a root-only pytest dir
        try:
            self._start(bin_dir)
        except BaseException:
            self.stop()  # nothing left running or on disk
            raise

    def _start(self, bin_dir: Path) -> None:
        assert self.root is not None
        as_user = self._as_server_user()
        if as_user:
            os.chown(self.root, as_user["user"], as_user["group"])
        data = self.root / "data"
        made = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
                               "-E", "UTF8", "--locale=C", "--no-sync"], capture_output=True, text=True,
                              cwd=self.root, **as_user)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed ({made.returncode}): {made.stderr.strip()[-2000:]}")
        argv = [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.root), "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=300"]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True, **as_user)
        wait_until(self._accepts, 30, 0.1, what="postgres")
        self.create_database(self.database)

    def _accepts(self) -> bool:
        import psycopg

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
        try:
            psycopg.connect(self._dsn("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (when it is not there yet) and return its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def log(self) -> str:
        path = (self.root or Path("/nonexistent")) / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: roll back open transactions, exit
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


@dataclass
class Stack:
    root: Path
    redis: RedisServer
    env: dict[str, str]
    api_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def csra(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:  # the child keeps its own copy of the file
            proc = subprocess.Popen([sys.executable, "-m", "csra.cli", *args], env=env or self.env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    @contextmanager
    def serve(self, name: str, command: str, port_setting: str, probe: str, accept: tuple[int, ...],
              timeout: float, **settings: str) -> Iterator[str]:
        """One more ``csra <command>`` (``csra api``, ``csra ui``) on a free port, with this stack's settings
        plus ``settings``: yields its URL once ``probe`` answers one of ``accept``, stops it after the block."""
        port = free_port()
        proc = self.csra(name, command, env={**self.env, port_setting: str(port), **settings})
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"`csra {command}` exited with {proc.returncode}:\n"
                                   f"{(self.root / f'{name}.log').read_text()[-3000:]}")
            try:
                return httpx.get(f"{url}{probe}", timeout=2).status_code in accept
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, timeout, 0.3, what=f"`csra {command}` ({name})")
            yield url
        finally:
            self.stop_proc(name)

    def boot(self, workers: tuple[tuple[str, ...], ...]) -> None:
        """Migrate the database, register a tiny random model as "baseline" (the real code paths, in
        seconds), start ``workers`` (each ``(queue, *extra args)``) and the API, and wait until all answer."""
        self.run_cli("migrate")
        with tiny_baseline(self.env):
            for queue, *extra in workers:
                self.start_worker(queue, *extra)
            self.csra("api", "api")
        beat = any("--beat" in extra for _, *extra in workers)  # that worker also runs the maintenance loop
        self.wait_ready(tuple(queue for queue, *_ in workers) + (("maintenance",) if beat else ()))

    def run_cli(self, *args: str) -> None:
        """One ``csra`` command to its end (it must succeed)."""
        done = subprocess.run([sys.executable, "-m", "csra.cli", *args], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`csra {' '.join(args)}` exited with {done.returncode}:\n{done.stdout[-2000:]}"
                               f"{done.stderr[-3000:]}")

    def start_worker(self, queue: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.csra(f"worker-{queue}", "worker", "--queue", queue, *extra)

    def stop_proc(self, name: str, sig: int | None = signal.SIGTERM) -> None:
        """Send ``sig`` to the process's group (None: it was sent already) and wait for it to end."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        if sig is not None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():  # all at once: each worker's warm shutdown takes a moment
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            self.stop_proc(name, None)  # waits (SIGKILL after 20 s)
        self.redis.stop()

    def health(self) -> dict:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_ready(self, queues: tuple[str, ...], timeout: float = 60) -> None:
        def ready() -> bool:
            h = self.health()
            return bool(h) and h.get("status") == "ok" and all(h["workers"].get(q) for q in queues)

        try:
            wait_until(ready, timeout, 0.5, what=f"API and workers for {queues}")
        except TimeoutError:
            raise TimeoutError(f"stack not ready: {self.health()}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.root.glob("*.log"))


@contextmanager
def tiny_baseline(env: dict[str, str]) -> Iterator[None]:
    """``csra models init --tiny`` (a tiny random model registered as "baseline") while the block starts
    the stack's processes, then wait for it (it must succeed). Both are mostly imports: the machine's two
    cores take them together in about two thirds of the time one after the other."""
    init = subprocess.Popen([sys.executable, "-m", "csra.cli", "models", "init", "--tiny"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        out, _ = init.communicate(timeout=120)
    if init.returncode != 0:
        raise RuntimeError(f"`csra models init --tiny` exited with {init.returncode}:\n{out.decode()[-3000:]}")


def stack_env(root: Path, redis_url: str, api_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
    env.update(
        CSRA_DATA_DIR=str(root / "data"),
        CSRA_REDIS_URL=redis_url,
        CSRA_API_PORT=str(api_port),
        CSRA_HEARTBEAT_SECONDS="0.5",
        CSRA_STALE_AFTER_SECONDS="3",
        CSRA_REAP_INTERVAL_SECONDS="1",
        CSRA_LOST_MESSAGE_AFTER_SECONDS="3",
        CSRA_MAX_ATTEMPTS="2",
        CSRA_IMPORT_ROOTS=f'["{root / "imports"}"]',
        CSRA_TORCH_THREADS="1",  # a core stays free for the rest (the UI tests drive a browser beside training)
        CSRA_MAX_UPLOAD_MB="2",
        CSRA_GEN_STREAM_EVERY_MS="0",  # the tests read every decoded piece (tests/workers/test_stream.py: coalescing)
        CSRA_GEN_STREAM_UPDATES_PER_SECOND="0",  # however many replies stream at once
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env
