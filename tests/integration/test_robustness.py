"""Every cancel is real and every job has a deadline.

Real processes throughout (redis-server, Celery workers, uvicorn); the time-limit tests run a
stack of their own with limits of a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from tests.integration.helpers import wait_job
from tests.stack import RedisServer, Stack, free_port, stack_env, wait_until


def _stream(url: str, job_id: int, on_token=None) -> tuple[list[str], dict | None, float]:  # type: ignore[no-untyped-def]
    """Read GET /jobs/{id}/stream: (token texts, the done payload, when the stream ended)."""
    tokens: list[str] = []
    done = None
    with httpx.stream("GET", f"{url}/jobs/{job_id}/stream", timeout=60) as resp:
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "token":
                tokens.append(json.loads(line[5:])["text"])
                if on_token is not None:
                    on_token(len(tokens))
            elif line.startswith("data:") and event == "done":
                done = json.loads(line[5:])
                break
    return tokens, done, time.monotonic()


def test_cancel_during_a_long_generation_stops_decoding(api, stack):
    chat = api.post("/chats", json={"title": "cancel me"}).json()
    sent = api.post(f"/chats/{chat['id']}/messages", json={"content": "Tell me everything about my order",
                                                           "max_new_tokens": 2048})
    assert sent.status_code == 202, sent.text
    job_id = sent.json()["job"]["id"]
    streamed: list = []
    reader = threading.Thread(target=lambda: streamed.append(_stream(stack.url, job_id)))
    reader.start()
    wait_until(lambda: api.get(f"/jobs/{job_id}").json()["stage"] in ("waiting for a batch", "generating"), 60,
               0.05, "decoding to start")
    job = api.get(f"/jobs/{job_id}").json()
    worker = psutil.Process(int(job["worker"].rsplit(":", 1)[1]))
    time.sleep(0.5)  # decoding (the tiny model needs many seconds for 2048 tokens)
    cancelled_at = time.monotonic()
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
    reader.join(30)
    _tokens, done, ended = streamed[0]
    assert ended - cancelled_at < 2.0, "the stream did not end within 2 s of the cancel"
    assert done is not None and done["status"] == "cancelled", done
    # decoding stopped: the worker is idle, and nothing was written to the stream after its end marker
    busy = worker.cpu_times()
    time.sleep(1.0)
    now = worker.cpu_times()
    assert (now.user + now.system) - (busy.user + busy.system) < 0.3, "the worker kept decoding after the cancel"
    entries = redis.Redis.from_url(stack.redis.url).xrange(f"csra:stream:{job_id}")
    kinds = [fields[b"type"].decode() for _, fields in entries]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    messages = api.get(f"/chats/{chat['id']}").json()["messages"]
    assert messages[0]["content"] == "Tell me everything about my order"  # the user turn is kept
    assert messages[-1]["role"] == "assistant" and messages[-1]["status"] == "cancelled"


# --------------------------------------------------------------------------- time limits


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, bitext_path: Path) -> Iterator[Stack]:
    """A stack whose import, training and generation jobs may run a few seconds only."""
    root = tmp_path_factory.mktemp("limited")
    (root / "imports").mkdir()
    server = RedisServer(root / "redis")
    server.start()
    port = free_port()
    env = stack_env(root, server.url, port, CSRA_TIME_LIMIT_IMPORT="8", CSRA_TIME_LIMIT_TRAIN="3",
                    CSRA_TIME_LIMIT_GENERATE="1", CSRA_TIME_LIMIT_GRACE_SECONDS="2",
                    CSRA_STALE_AFTER_SECONDS="60", CSRA_HEARTBEAT_SECONDS="1")
    st = Stack(root=root, redis=server, env=env, api_port=port)
    try:
        st.boot((("default",), ("train",), ("generate",)))
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def small_csv(limited: Stack, bitext_path: Path) -> Path:
    """400 drawn Bitext rows (the file is sorted by intent): an import well inside this stack's 8 s limit."""
    import pandas as pd

    small = limited.root / "imports" / "small.csv"
    pd.read_csv(bitext_path).sample(400, random_state=0).to_csv(small, index=False)
    return small


def test_a_job_past_its_time_limit_fails_naming_the_setting(limited, small_csv):
    with httpx.Client(base_url=limited.url, timeout=30) as api:
        ds = api.post("/datasets", json={"name": "b", "source": str(small_csv)}).json()
        assert wait_job(api, ds["job"]["id"])["status"] == "succeeded"
        train = api.post("/jobs/train", json={"dataset_id": ds["dataset"]["id"], "epochs": 50,
                                              "max_train_samples": 64, "batch_size": 4}).json()
        job = wait_job(api, train["id"], timeout=120)
        assert job["status"] == "failed", job
        assert "time limit of 3 s (CSRA_TIME_LIMIT_TRAIN)" in job["error"]
        assert "Raise CSRA_TIME_LIMIT_TRAIN" in job["error"]
        chat = api.post("/chats", json={"title": "slow"}).json()
        sent = api.post(f"/chats/{chat['id']}/messages",
                        json={"content": "write a lot", "max_new_tokens": 2048}).json()
        gen = wait_job(api, sent["job"]["id"], timeout=60)
        assert gen["status"] == "failed" and "CSRA_TIME_LIMIT_GENERATE" in gen["error"], gen
        reply = api.get(f"/chats/{chat['id']}").json()["messages"][-1]
        assert reply["status"] == "failed" and "CSRA_TIME_LIMIT_GENERATE" in reply["error"]


def test_a_hung_job_is_killed_at_its_hard_limit(limited, bitext_path, small_csv):
    """A job that cannot even stop itself (its process frozen) is killed when the hard limit passes."""
    import pandas as pd

    big = limited.root / "imports" / "big.csv"  # long enough to be caught running
    src = pd.read_csv(bitext_path)
    pd.concat([src.assign(instruction=src["instruction"] + f" ({i})") for i in range(10)]).to_csv(big, index=False)
    with httpx.Client(base_url=limited.url, timeout=30) as api:
        ds = api.post("/datasets", json={"name": "hang", "source": str(big)}).json()
        job = wait_job(api, ds["job"]["id"], until={"running", "succeeded", "failed"})
        assert job["status"] == "running", job
        pid = int(job["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGSTOP)  # hung: no step, no check, no soft-limit handler can run
        try:
            done = wait_job(api, ds["job"]["id"], timeout=60)
        finally:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        assert done["status"] == "failed", done
        assert "hard time limit of 10 s (CSRA_TIME_LIMIT_IMPORT + CSRA_TIME_LIMIT_GRACE_SECONDS)" in done["error"]
        assert "killed" in done["error"]
        # the worker slot is free again: the next import runs
        again = api.post("/datasets", json={"name": "again", "source": str(small_csv)}).json()
        assert wait_job(api, again["job"]["id"], timeout=60)["status"] == "succeeded"
