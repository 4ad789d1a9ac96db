"""Chat latency on an idle stack vs while a training job runs, side by side in one run.

    python bench/chat_while_training.py [--burst 8] [--tokens 64] [--train-rows 400] [--without-yield]

Starts a throw-away ``csra up --no-ui`` (real SmolLM2-135M baseline, Bitext copy) in a temporary
data dir, then:
  1. idle: bursts of ``--burst`` concurrent chat messages (greedy, ``--tokens`` new tokens each),
     end-to-end latency through API -> queue -> worker -> SSE;
  2. training alone: a fine-tune of the baseline on ``--train-rows`` rows, its steps per minute;
  3. the same bursts while that training job runs, and how far training got meanwhile.
Goal (issue "green on every machine", item 5): chat p50 latency during training <= 1.5x idle,
and training still progresses. ``--without-yield`` repeats 2-3 with CSRA_TRAIN_YIELDS_TO_CHAT=false
(what happened before training paused for chats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.generate import MESSAGES  # noqa: E402
from csra.client import Client  # noqa: E402
from tests.stack import free_port, wait_until  # noqa: E402


def chat_once(url: str, message: str, tokens: int, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        job = c.post("/jobs/generate", json={"message": message, "max_new_tokens": tokens}).json()
        event = None
        with c.stream("GET", f"/jobs/{job['id']}/stream") as resp:
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "done":
                    done = json.loads(line.split(":", 1)[1])
                    assert done["status"] == "succeeded", done
                    break
        out.append(time.perf_counter() - t0)


def burst(url: str, n: int, tokens: int) -> list[float]:
    """``n`` chat messages sent at once; each one's end-to-end seconds."""
    latencies: list[float] = []
    threads = [threading.Thread(target=chat_once, args=(url, MESSAGES[i % len(MESSAGES)], tokens, latencies))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def steps_done(c: httpx.Client, job_id: int) -> int:
    with Client(base_url=str(c.base_url)) as api:  # pages through the events (at most 500 a call)
        metrics = api.job_events(job_id, kind="metric")
    return max((e["data"]["step"] for e in metrics if e.get("data") and "loss" in e["data"]), default=0)


class Stack:
    def __init__(self, root: Path, yield_to_chat: bool) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CSRA_")}
        env.update(CSRA_DATA_DIR=str(root / "var"), CSRA_API_PORT=str(self.port), CSRA_REDIS_PORT=str(free_port()),
                   CSRA_TRAIN_YIELDS_TO_CHAT="true" if yield_to_chat else "false", PYTHONUNBUFFERED="1")
        self.log = (root / "up.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "csra.cli", "up", "--no-ui"], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        try:
            h = httpx.get(f"{self.url}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return h.get("status") == "ok" and all(h["workers"].get(q) for q in ("default", "train", "generate"))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)


def run(args: argparse.Namespace, yield_to_chat: bool, idle: list[float] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="csra-bench-") as tmp:
        stack = Stack(Path(tmp), yield_to_chat)
        try:
            wait_until(stack.ready, 300, 1.0, "csra up")
            c = httpx.Client(base_url=stack.url, timeout=60)
            ds = c.post("/datasets", json={"name": "bitext", "source": str(args.data)}).json()
            wait_until(lambda: c.get(f"/jobs/{ds['job']['id']}").json()["status"] == "succeeded", 120, 0.5, "import")
            burst(stack.url, 2, args.tokens)  # warm-up: the generate worker loads the model
            if idle is None:
                idle = [x for _ in range(args.rounds) for x in burst(stack.url, args.burst, args.tokens)]
            job = c.post("/jobs/train", json={"dataset_id": ds["dataset"]["id"], "epochs": 1, "batch_size": 8,
                                              "max_train_samples": args.train_rows, "logging_steps": 1,
                                              "eval_every": 100000, "max_eval_samples": 8}).json()
            wait_until(lambda: steps_done(c, job["id"]) >= 2, 600, 1.0, "training to start")
            s0, t0 = steps_done(c, job["id"]), time.monotonic()
            time.sleep(args.alone_seconds)
            alone_rate = (steps_done(c, job["id"]) - s0) / (time.monotonic() - t0) * 60
            busy: list[float] = []
            s0, t0 = steps_done(c, job["id"]), time.monotonic()
            for _ in range(args.rounds):
                busy += burst(stack.url, args.burst, args.tokens)
                time.sleep(args.gap)  # a pause between bursts, as agents type
            during_rate = (steps_done(c, job["id"]) - s0) / (time.monotonic() - t0) * 60
            c.post(f"/jobs/{job['id']}/cancel")
            return {"idle": idle, "busy": busy, "alone_steps_per_min": alone_rate,
                    "during_steps_per_min": during_rate, "yield": yield_to_chat}
        finally:
            stack.stop()


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    idle = results[0]["idle"]
    print(f"\nchat while training: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"bursts of {args.burst} concurrent messages x {args.tokens} tokens, {args.rounds} rounds; "
          f"training SmolLM2-135M, batch 8")
    print("\n| stack | chat p50 (s) | p90 (s) | x idle | training steps/min | goal met |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(idle)
    print(f"| idle | {base:.2f} | {statistics.quantiles(idle, n=10)[-1]:.2f} | 1.00 | - | |")
    for r in results:
        label = "training, yields to chat" if r["yield"] else "training, no yielding (before)"
        p50 = statistics.median(r["busy"])
        ok = p50 <= 1.5 * base and r["during_steps_per_min"] > 0
        print(f"| {label} | {p50:.2f} | {statistics.quantiles(r['busy'], n=10)[-1]:.2f} | {p50 / base:.2f} | "
              f"{r['during_steps_per_min']:.1f} (alone {r['alone_steps_per_min']:.1f}) | {'yes' if ok else 'no'} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burst", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gap", type=float, default=10.0, help="seconds between bursts")
    p.add_argument("--alone-seconds", type=float, default=60.0)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/bitext/bitext_customer_support.csv")
    p.add_argument("--without-yield", action="store_true", help="also run with CSRA_TRAIN_YIELDS_TO_CHAT=false")
    args = p.parse_args()
    results = [run(args, True, None)]
    if args.without_yield:
        results.append(run(args, False, results[0]["idle"]))
    report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
