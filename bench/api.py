"""API throughput and queue latency, against a running stack or a throw-away one.

    python bench/api.py --start [--api-workers N]          # own redis + migrate + default worker + API
    python bench/api.py --start --database both            # the same on SQLite, then on PostgreSQL
    python bench/api.py --url http://127.0.0.1:8000 [--api-key KEY]
    options: --clients 16 --seconds 10 --submit-interval 0.5 --queue-jobs 20 --client raw|httpx

1. Polling: ``--clients`` concurrent clients poll ``GET /jobs/{id}`` for ``--seconds`` while a
   submitter uploads a 20-row CSV (``POST /datasets``, an import job) every ``--submit-interval``
   seconds. Reports polls/s, p50/p99 poll latency, submissions and their p50/p99. The pollers are
   minimal keep-alive HTTP/1.1 connections by default (``--client httpx`` for httpx.AsyncClient,
   which costs about as much CPU per request as the API does, on the same cores).
2. Queue latency: on the (now idle) default worker, ``--queue-jobs`` imports are submitted one at a
   time, each waited for; reports p50/p95 of ``started_at - created_at``.

With ``--start``, ``--database sqlite|postgresql|both`` picks the throw-away stack's database (PostgreSQL:
a temporary server, tests/stack.py ``PostgresServer``); ``both`` ends with the two side by side.

Goals: >= 500 polls/s, poll p99 < 100 ms, queue latency p50 < 50 ms. Only loopback addresses are
used; every loop is bounded in count and time.
"""

# ruff: noqa: T201  (a benchmark prints its results)
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from csra.settings import get_settings  # noqa: E402
from tests.stack import PostgresServer, RedisServer, Stack, free_port, stack_env  # noqa: E402

GOAL_POLLS_PER_S = 500.0
GOAL_POLL_P99_MS = 100.0
GOAL_QUEUE_P50_MS = 50.0
JOB_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
INTENTS = ("cancel_order", "track_order", "get_refund", "change_shipping_address")


# --------------------------------------------------------------------------- measurements


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Samples:
    """Latencies (ms) of successful calls, and a count of failed ones."""

    ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    job_ids: list[int] = field(default_factory=list)  # jobs created (uploads only)

    def fail(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what


@dataclass
class QueueSample:
    """One job's timeline, in ms after ``created_at``."""

    enqueued_ms: float
    started_ms: float
    status: str


def tiny_csv(seed: int, rows: int = 20) -> bytes:
    """A small Bitext-shaped CSV whose rows are unique (so cleaning keeps them all)."""
    lines = ["flags,instruction,category,intent,response"]
    for i in range(rows):
        intent = INTENTS[i % len(INTENTS)]
        lines.append(
            f'B,"I need help with order {seed}-{i}, {intent.replace("_", " ")} please",ORDER,{intent},'
            f'"Thanks for reaching out about order {seed}-{i}. I will take care of it right away."'
        )
    return ("\n".join(lines) + "\n").encode()


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- HTTP calls


async def submit_import(client: httpx.AsyncClient, seed: int) -> dict[str, Any]:
    """Upload a tiny CSV as a new dataset; returns the created import job."""
    files = {"file": (f"bench-{seed}.csv", tiny_csv(seed), "text/csv")}
    r = await client.post("/datasets", files=files, data={"name": f"bench-{seed}"})
    r.raise_for_status()
    return r.json()["job"]


async def wait_job(client: httpx.AsyncClient, job_id: int, interval: float = 0.01) -> dict[str, Any]:
    """Poll a job until it ends (at most JOB_TIMEOUT_S)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        r = await client.get(f"/jobs/{job_id}")
        r.raise_for_status()
        job = r.json()
        if job["finished"]:
            return job
        await asyncio.sleep(interval)
    raise TimeoutError(f"job {job_id} did not finish in {JOB_TIMEOUT_S:.0f} s")


async def httpx_poller(client: httpx.AsyncClient, job_id: int, until: float, out: Samples) -> None:
    """One httpx client: ``GET /jobs/{id}`` back to back until ``until`` (monotonic)."""
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            r = await client.get(f"/jobs/{job_id}")
            if r.status_code == 200:
                out.ms.append((time.perf_counter() - t0) * 1000)
            else:
                out.fail(f"HTTP {r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as e:
            out.fail(f"{type(e).__name__}: {e}")


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client for one GET, so the load generator costs little CPU
    (httpx spends about as much CPU per request as the API itself, on the same 2 cores)."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> tuple[int, bytes]:
        """(status, body) of one request; reconnects when the connection was closed."""
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def raw_poller(url: str, headers: dict[str, str], job_id: int, until: float, out: Samples) -> None:
    """One raw keep-alive client: ``GET /jobs/{id}`` back to back until ``until`` (monotonic)."""
    conn = RawConnection(url, f"/jobs/{job_id}", headers)
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.get(), timeout=REQUEST_TIMEOUT_S)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    TimeoutError) as e:
                out.fail(f"{type(e).__name__}: {e}")
                conn.close()
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                out.ms.append((time.perf_counter() - t0) * 1000)
            else:
                out.fail(f"HTTP {status}: {body[:200]!r}")
    finally:
        conn.close()


async def submitter(client: httpx.AsyncClient, until: float, interval: float, out: Samples) -> None:
    """Upload a tiny dataset every ``interval`` seconds until ``until`` (monotonic)."""
    seed = 10_000
    next_at = time.monotonic()
    while next_at < until:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        seed += 1
        t0 = time.perf_counter()
        try:
            job = await submit_import(client, seed)
            out.ms.append((time.perf_counter() - t0) * 1000)
            out.job_ids.append(job["id"])
        except httpx.HTTPError as e:
            out.fail(f"{type(e).__name__}: {e}")
        next_at += interval


# --------------------------------------------------------------------------- phases


@dataclass
class PollResult:
    seconds: float
    polls: Samples
    submissions: Samples
    client_cpu_s: float
    server_cpu_s: float | None
    machine_busy_s: float


async def poll_phase(client: httpx.AsyncClient, job_id: int, args: argparse.Namespace,
                     server: list[psutil.Process]) -> PollResult:
    """N pollers plus one submitter for a fixed time."""
    polls, subs = Samples(), Samples()
    me = psutil.Process()
    cpu0, srv0, busy0 = me.cpu_times(), server_cpu(server), machine_busy()
    t0 = time.monotonic()
    until = t0 + args.seconds
    if args.client == "raw":
        headers = {k: v for k, v in client.headers.items() if k.lower() == "authorization"}
        tasks = [raw_poller(str(client.base_url), headers, job_id, until, polls) for _ in range(args.clients)]
    else:
        tasks = [httpx_poller(client, job_id, until, polls) for _ in range(args.clients)]
    tasks.append(submitter(client, until, args.submit_interval, subs))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    cpu1, srv1, busy1 = me.cpu_times(), server_cpu(server), machine_busy()
    client_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    server_used = None if srv0 is None or srv1 is None else srv1 - srv0
    return PollResult(elapsed, polls, subs, client_cpu, server_used, busy1 - busy0)


async def drain(client: httpx.AsyncClient, job_ids: list[int]) -> None:
    """Wait for the polling phase's imports to end, so the queue-latency phase finds an idle worker."""
    for job_id in job_ids:
        await wait_job(client, job_id, interval=0.1)


async def queue_phase(client: httpx.AsyncClient, count: int) -> list[QueueSample]:
    """Submit ``count`` imports one at a time, waiting for each; their queue timelines."""
    out = []
    for i in range(count):
        job = await wait_job(client, (await submit_import(client, 20_000 + i))["id"])
        created = parse_ts(job["created_at"])
        enqueued = parse_ts(job["enqueued_at"]) if job.get("enqueued_at") else created
        started = parse_ts(job["started_at"]) if job.get("started_at") else created
        out.append(QueueSample((enqueued - created).total_seconds() * 1000,
                               (started - created).total_seconds() * 1000, job["status"]))
        await asyncio.sleep(0.05)  # the worker goes back to waiting on the queue
    return out


# --------------------------------------------------------------------------- report


def row(metric: str, value: str, goal: str = "", met: bool | None = None, note: str = "") -> str:
    """One table line: metric, value, goal, MET/MISSED (when there is a goal), note."""
    verdict = "" if met is None else ("MET" if met else "MISSED")
    return f"{metric:<46}{value:>10}   {goal:<8}{verdict:<8}{note}".rstrip()


def report(args: argparse.Namespace, url: str, poll: PollResult, queue: list[QueueSample]) -> dict[str, float]:
    """Print the results table with the goals; the headline numbers, ``ok`` 1.0 when every goal is met."""
    secs = poll.seconds
    rate = len(poll.polls.ms) / secs
    p99 = percentile(poll.polls.ms, 99)
    q_start = [s.started_ms for s in queue]
    q50 = percentile(q_start, 50)
    goals = [rate >= GOAL_POLLS_PER_S, p99 < GOAL_POLL_P99_MS, q50 < GOAL_QUEUE_P50_MS]
    subs = poll.submissions
    workers = args.api_workers if args.start else "n/a"
    lines = [
        "",
        f"csra API benchmark: {url}  ({args.clients} {args.client} clients, {secs:.1f} s, "
        f"API workers: {workers}, {os.cpu_count()} CPUs, database: {getattr(args, 'db_name', 'as configured')})",
        "-" * 92,
        row("metric", "value", "goal"),
        "-" * 92,
        row("GET /jobs/{id} polls/s", f"{rate:.1f}", f">= {GOAL_POLLS_PER_S:g}", goals[0]),
        row("GET /jobs/{id} p50 latency (ms)", f"{percentile(poll.polls.ms, 50):.1f}"),
        row("GET /jobs/{id} p99 latency (ms)", f"{p99:.1f}", f"< {GOAL_POLL_P99_MS:g}", goals[1]),
        row("GET /jobs/{id} polls", str(len(poll.polls.ms)), note=f"{poll.polls.errors} errors"),
        row("POST /datasets uploads while polling", str(len(subs.ms)), note=f"{subs.errors} errors"),
        row("POST /datasets p50 latency (ms)", f"{percentile(subs.ms, 50):.1f}"),
        row("POST /datasets p99 latency (ms)", f"{percentile(subs.ms, 99):.1f}"),
        row("queue latency started-created p50 (ms)", f"{q50:.1f}", f"< {GOAL_QUEUE_P50_MS:g}", goals[2]),
        row("queue latency started-created p95 (ms)", f"{percentile(q_start, 95):.1f}"),
        row("  enqueued_at-created_at p50 (ms)", f"{percentile([s.enqueued_ms for s in queue], 50):.1f}",
            note="API: insert + commit + publish (stamped after the publish)"),
        row("queue-latency jobs", str(len(queue)),
            note=f"{sum(s.status == 'succeeded' for s in queue)} succeeded"),
        row("load generator CPU while polling (cores)", f"{poll.client_cpu_s / secs:.2f}"),
    ]
    if poll.server_cpu_s is not None:
        per_request = poll.server_cpu_s * 1000 / max(1, len(poll.polls.ms) + len(subs.ms))
        lines.append(row("API server CPU while polling (cores)", f"{poll.server_cpu_s / secs:.2f}"))
        lines.append(row("API server CPU per request (ms)", f"{per_request:.2f}",
                         note="robust to other load on the machine"))
    lines += [
        row("whole machine CPU busy while polling (cores)", f"{poll.machine_busy_s / secs:.2f}",
            note=f"of {os.cpu_count()}, other processes included"),
        "-" * 92,
        *(f"first {what} error: {s.first_error}" for what, s in (("poll", poll.polls), ("upload", subs))
          if s.first_error),
        f"all goals met: {all(goals)}",
    ]
    print("\n".join(lines))
    return {"polls_per_s": rate, "poll_p50_ms": percentile(poll.polls.ms, 50), "poll_p99_ms": p99,
            "upload_p50_ms": percentile(subs.ms, 50), "queue_p50_ms": q50, "queue_p95_ms": percentile(q_start, 95),
            "errors": float(poll.polls.errors + subs.errors), "ok": float(all(goals)),
            "api_cpu_ms": math.nan if poll.server_cpu_s is None else
            poll.server_cpu_s * 1000 / max(1, len(poll.polls.ms) + len(subs.ms)),
            "machine_busy": poll.machine_busy_s / secs}


def side_by_side(results: dict[str, dict[str, float]]) -> None:
    """The headline numbers of each database in one table."""
    names = list(results)
    metrics = [("GET /jobs/{id} polls/s", "polls_per_s"), ("GET /jobs/{id} p50 (ms)", "poll_p50_ms"),
               ("GET /jobs/{id} p99 (ms)", "poll_p99_ms"), ("POST /datasets p50 (ms)", "upload_p50_ms"),
               ("queue started-created p50 (ms)", "queue_p50_ms"),
               ("queue started-created p95 (ms)", "queue_p95_ms"), ("API CPU per request (ms)", "api_cpu_ms"),
               ("machine CPU busy (cores)", "machine_busy"), ("errors", "errors")]
    print("\n" + f"{'':<34}" + "".join(f"{n:>14}" for n in names))
    for label, key in metrics:
        print(f"{label:<34}" + "".join(f"{results[n][key]:>14.2f}" for n in names))
    print(f"{'all goals met':<34}" + "".join(f"{bool(results[n]['ok'])!s:>14}" for n in names))


# --------------------------------------------------------------------------- stack


def server_processes(pid: int | None) -> list[psutil.Process]:
    """The API process and its children (uvicorn workers), to measure their CPU."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def machine_busy() -> float:
    """CPU seconds all processes on this machine have used (to see load from elsewhere)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def server_cpu(procs: list[psutil.Process]) -> float | None:
    if not procs:
        return None
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@contextmanager
def throwaway_database(database: str) -> Iterator[dict[str, str]]:
    """The settings for a throw-away database: SQLite in the stack's data dir, or a temporary PostgreSQL."""
    if database == "sqlite":
        yield {}
        return
    pg = PostgresServer(database="bench")
    pg.start()
    try:
        yield {"CSRA_DATABASE_URL": pg.url}
    finally:
        pg.stop()


@contextmanager
def throwaway_stack(api_workers: int, database: str = "sqlite") -> Iterator[Stack]:
    """redis-server + migrate + one default worker + API on free loopback ports, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="csra-bench-") as tmp, throwaway_database(database) as db_env:
        root = Path(tmp)
        (root / "imports").mkdir()
        server = RedisServer(root / "redis")
        server.start(persist=False)
        port = free_port()
        # production timings, not the test suite's fast heartbeats and sweeps
        env = stack_env(root, server.url, port, CSRA_HEARTBEAT_SECONDS="5", CSRA_STALE_AFTER_SECONDS="60",
                        CSRA_REAP_INTERVAL_SECONDS="15", CSRA_LOST_MESSAGE_AFTER_SECONDS="30",
                        CSRA_MAX_UPLOAD_MB="20", **db_env)
        stack = Stack(root=root, redis=server, env=env, api_port=port)
        try:
            subprocess.run([sys.executable, "-m", "csra.cli", "migrate"], env=env, check=True,
                           capture_output=True, timeout=120)
            # a tiny "baseline" (as the tests use): imports count tokens with its tokenizer, instead of the
            # first import converting the real default model (20+ s) in this fresh data dir
            subprocess.run([sys.executable, "-m", "csra.cli", "models", "init", "--tiny"], env=env, check=True,
                           capture_output=True, timeout=300)
            stack.start_worker("default")
            stack.csra("api", "api", "--workers", str(api_workers))
            stack.wait_ready(("default",), timeout=90)
            yield stack
        finally:
            stack.stop()


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"refusing {url}: this benchmark only talks to loopback addresses")


# --------------------------------------------------------------------------- main


async def run(url: str, args: argparse.Namespace, api_pid: int | None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    client = httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits)
    async with client:
        job = await wait_job(client, (await submit_import(client, 1))["id"])
        print(f"polling job {job['id']} ({job['status']}); {args.clients} clients for {args.seconds:g} s, "
              f"one upload every {args.submit_interval:g} s ...", flush=True)
        poll = await poll_phase(client, job["id"], args, server_processes(api_pid))
        await drain(client, poll.submissions.job_ids)
        print(f"queue latency: {args.queue_jobs} imports, one at a time ...", flush=True)
        queue = await queue_phase(client, args.queue_jobs)
    return report(args, url, poll, queue)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running API (default: CSRA_API_URL)")
    p.add_argument("--api-key", default=None, help="default: CSRA_API_KEY")
    p.add_argument("--start", action="store_true", help="start a throw-away stack (redis, worker, API)")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn workers of the --start API")
    p.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="sqlite",
                   help="the --start stack's database (postgresql: a temporary server; both: one after the other)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="pollers: minimal keep-alive HTTP/1.1 (low CPU) or httpx.AsyncClient")
    p.add_argument("--submit-interval", type=float, default=0.5, help="seconds between uploads while polling")
    p.add_argument("--queue-jobs", type=int, default=20, help="imports for the queue-latency phase")
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.seconds <= 120 and 1 <= args.queue_jobs <= 200
            and 0.05 <= args.submit_interval <= 60 and 1 <= args.api_workers <= 16):
        p.error("out of bounds: clients 1-256, seconds 1-120, queue-jobs 1-200, submit-interval 0.05-60, "
                "api-workers 1-16")
    return args


def guarded(url: str, args: argparse.Namespace, api_pid: int | None) -> dict[str, float]:
    """``run``, with HTTP failures of the setup calls as one readable line."""
    try:
        return asyncio.run(run(url, args, api_pid))
    except httpx.HTTPStatusError as e:
        sys.exit(f"{e.request.method} {e.request.url}: HTTP {e.response.status_code} {e.response.text[:300]}")
    except httpx.TransportError as e:
        sys.exit(f"cannot reach the API at {url}: {type(e).__name__} {e}")
    except TimeoutError as e:
        sys.exit(f"gave up: {e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.start:
        args.api_key = None  # the throw-away stack runs without a key
        results = {}
        for database in ("sqlite", "postgresql") if args.database == "both" else (args.database,):
            args.db_name = database
            with throwaway_stack(args.api_workers, database) as stack:
                api = stack.procs["api"]
                results[database] = guarded(stack.url, args, api.pid)
        if len(results) > 1:
            side_by_side(results)
        ok = all(r["ok"] for r in results.values())
    else:
        settings = get_settings()
        url = (args.url or settings.api_url).rstrip("/")
        args.api_key = args.api_key or settings.api_key
        check_loopback(url)
        ok = bool(guarded(url, args, None)["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
