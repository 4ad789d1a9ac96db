"""Small helpers for integration tests (HTTP against the real stack)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd


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


def bitext_sample(imports: Path, bitext_path: Path, per_intent: int, seed: int = 0) -> Path:
    """A stratified draw of the Bitext copy (``per_intent`` rows of each of its 27 intents) written to
    the stack's ``imports`` folder. For tests whose evaluations embed the train split (a whole copy
    is minutes on two cores) but need every intent, not the copy's size."""
    path = imports / f"bitext-{per_intent}-per-intent.csv"
    if not path.exists():
        rows = pd.read_csv(bitext_path)
        drawn = rows.groupby("intent", group_keys=False).sample(n=per_intent, random_state=seed)
        drawn.to_csv(path, index=False)
    return path


def import_path(api: httpx.Client, path: str, **options: Any) -> dict[str, Any]:
    resp = api.post("/datasets", json={"name": "t", "source": path, "options": options})
    assert resp.status_code == 202, resp.text
    return resp.json()


def upload(api: httpx.Client, filename: str, content: bytes, **data: str) -> httpx.Response:
    return api.post("/datasets", files={"file": (filename, content)}, data=data)


def train_scripted(api: httpx.Client, name: str, reply: str) -> str:
    """A tiny model fine-tuned (through the API, seconds) to always answer ``reply``: real text to check
    streaming, batching and placeholders on. Returns its name."""
    rows = "\n".join(f"please cancel order {i},{reply}" for i in range(40))
    r = api.post("/datasets", files={"file": (f"{name}.csv", f"customer,agent\n{rows}".encode())},
                 data={"options": json.dumps({"column_mapping": {"input": "customer", "output": "agent"}})})
    assert wait_job(api, r.json()["job"]["id"])["status"] == "succeeded"
    job = api.post("/jobs/train", json={"dataset_id": r.json()["dataset"]["id"], "epochs": 12, "batch_size": 8,
                                        "learning_rate": 1e-2, "precision": "fp32", "output_name": name})
    assert wait_job(api, job.json()["id"], timeout=240)["status"] == "succeeded"
    return name


def approve_in_chat(api: httpx.Client, question: str, answer: str) -> int:
    """Ask ``question`` in a new chat (retrieval answers it), approve ``answer`` as its reply: the memory
    entry's id (the answer memory must hold something for retrieval to answer)."""
    cid = api.post("/chats", json={"settings": {"model_id": "retrieval"}}).json()["id"]
    sent = api.post(f"/chats/{cid}/messages", json={"content": question}).json()
    assert wait_job(api, sent["job"]["id"])["status"] == "succeeded"
    reply = api.get(f"/chats/{cid}").json()["messages"][1]
    approved = api.post(f"/chats/{cid}/messages/{reply['id']}/feedback",
                        json={"rating": "up", "corrected_reply": answer})
    assert approved.status_code == 200, approved.text
    return int(approved.json()["memory_entry_id"])
