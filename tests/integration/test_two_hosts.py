"""Two "hosts" on one machine, end to end (docs/deploy.md): separate data dirs that share only a
PostgreSQL server, a Redis server and a ``file://`` model store that neither data dir contains.

Host A (API, default worker with the sweep, train worker) trains a model; host B (API, generate and
train workers, its own data dir) answers a chat with it and evaluates it; A exports it as GGUF; host A
is stopped and its data dir deleted, and B, with a fresh generate worker, still serves the model, with
torch and with llama.cpp from the export A published, and B's API serves the export's download;
deleting it then removes it from the store and B's cache. Every process is real.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.helpers import train_scripted, wait_job
from tests.stack import PostgresServer, RedisServer, Stack, free_port, stack_env

REPLY = "Your order is cancelled."


@dataclass
class Hosts:
    a: Stack
    b: Stack
    redis: RedisServer
    store: Path


def _host(root: Path, redis: RedisServer, **shared: str) -> Stack:
    (root / "imports").mkdir(parents=True)
    port = free_port()
    return Stack(root=root, redis=redis, env=stack_env(root, redis.url, port, **shared), api_port=port)


def _ran_on(api: httpx.Client, job_id: int, host: Stack, queue: str) -> bool:
    """Whether the job was claimed by ``host``'s ``queue`` worker (its process or a pool child of it)."""
    worker = api.get(f"/jobs/{job_id}").json()["worker"]
    pid = int(worker.rsplit(":", 1)[1])
    main = psutil.Process(host.procs[f"worker-{queue}"].pid)
    return pid in {main.pid, *(c.pid for c in main.children(recursive=True))}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("two-hosts")
    store = root / "store"  # in neither host's data dir
    store.mkdir()
    redis = RedisServer(root / "redis")
    redis.start()
    shared = {"CSRA_DATABASE_URL": postgres.create_database("twohosts"),
              "CSRA_MODEL_STORE_URL": f"file://{store}"}
    a = _host(root / "host-a", redis, **shared)
    b = _host(root / "host-b", redis, **shared)
    try:
        a.boot((("default", "--beat"), ("train",)))  # migrates and makes the baseline once, from host A
        yield Hosts(a, b, redis, store)
    finally:
        for host in (a, b):
            for name in list(host.procs):
                host.stop_proc(name)
        redis.stop()


def _train_on_a(hosts: Hosts) -> tuple[str, int]:
    """A trains (and publishes) a model: its name and dataset."""
    a = hosts.a
    with httpx.Client(base_url=a.url, timeout=30) as api_a:
        name = train_scripted(api_a, "two-hosts-scripted", REPLY)
        trained = [j for j in api_a.get("/jobs", params={"kind": "train"}).json()["data"]
                   if j["status"] == "succeeded"]
        assert trained and _ran_on(api_a, trained[0]["id"], a, "train")
    assert (hosts.store / name / "manifest.json").is_file(), "training on A published the model"
    return name, int(trained[0]["params"]["dataset_id"])


def _chat_and_evaluate_on_b(hosts: Hosts, name: str, dataset_id: int) -> None:
    b, data_b = hosts.b, Path(hosts.b.env["CSRA_DATA_DIR"])
    with httpx.Client(base_url=b.url, timeout=30) as api_b:
        chat = api_b.post("/chats", json={"settings": {"model_id": name, "max_new_tokens": 16}}).json()
        sent = api_b.post(f"/chats/{chat['id']}/messages", json={"content": "please cancel order 12"})
        assert sent.status_code == 202, sent.text
        job = wait_job(api_b, sent.json()["job"]["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["result"]["text"].startswith("Your order is cancelled")
        assert _ran_on(api_b, job["id"], b, "generate")
        marker = json.loads((data_b / "models" / ".cache" / f"{name}.json").read_text())
        assert marker["source"] == "fetched"  # B's copy came from the store, checked against its hash

        ev = api_b.post("/jobs/evaluate", json={"model_ids": [name], "dataset_id": dataset_id, "max_samples": 4,
                                                "max_new_tokens": 12, "split": "train"})
        assert ev.status_code == 202, ev.text
        done = wait_job(api_b, ev.json()["id"], timeout=240)
        assert done["status"] == "succeeded", done["error"]
        assert _ran_on(api_b, done["id"], b, "train")


def _export_on_a(hosts: Hosts, name: str) -> dict[str, Any]:
    """A's default worker exports the model as GGUF, and publishes it: the export job's result."""
    with httpx.Client(base_url=hosts.a.url, timeout=30) as api_a:
        r = api_a.post(f"/models/{name}/export", json={"quantization": "f16"})
        assert r.status_code == 202, r.text
        export = wait_job(api_a, r.json()["id"], timeout=180)
        assert export["status"] == "succeeded", export["error"]
    assert (hosts.store / name / "exports" / f"{export['result']['file']}.json").is_file(), "not published"
    return dict(export["result"])


def _generate(api: httpx.Client, name: str, **extra: str) -> dict[str, Any]:
    r = api.post("/jobs/generate", json={"model_id": name, "message": "please cancel order 99",
                                         "max_new_tokens": 16, **extra})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return dict(job["result"])


def _served_by_b_alone(hosts: Hosts, name: str, export: dict[str, Any]) -> None:
    """With A gone, B serves the model through torch and, from A's published export, llama.cpp; B's API
    serves the export's download; deleting the model removes it from the store and B's cache."""
    data_b = Path(hosts.b.env["CSRA_DATA_DIR"])
    with httpx.Client(base_url=hosts.b.url, timeout=30) as api_b:
        assert _generate(api_b, name)["text"].startswith("Your order is cancelled")
        if importlib.util.find_spec("llama_cpp") is not None:
            assert _generate(api_b, name, backend="llamacpp")["backend"] == "llamacpp:f16"
            assert (data_b / "models" / name / "exports" / export["file"]).is_file()  # fetched from the store
        files = api_b.get(f"/models/{name}/files").json()["data"]
        assert [f["name"] for f in files] == [export["file"]]
        download = api_b.get(files[0]["url"])
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == export["sha256"]

        assert (data_b / "models" / name).is_dir()
        assert api_b.delete(f"/models/{name}").status_code == 204
        assert not (hosts.store / name).exists() and not (data_b / "models" / name).exists()
        assert api_b.get(f"/models/{name}").status_code == 404


def test_a_model_trained_on_one_host_is_served_and_evaluated_on_another(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    name, dataset_id = _train_on_a(hosts)
    assert not (Path(b.env["CSRA_DATA_DIR"]) / "models" / name).exists()

    # host A trains no more: B's train worker takes the evaluation
    a.stop_proc("worker-train")
    b.start_worker("generate")
    b.start_worker("train")
    b.csra("api", "api")
    b.wait_ready(("generate", "train"))
    _chat_and_evaluate_on_b(hosts, name, dataset_id)
    export = _export_on_a(hosts, name)

    # host A goes away entirely, its data dir too; B (a fresh generate worker) still serves the model
    for proc in list(a.procs):
        a.stop_proc(proc)
    shutil.rmtree(a.env["CSRA_DATA_DIR"])
    b.stop_proc("worker-generate")
    b.start_worker("generate")
    b.wait_ready(("generate",))
    _served_by_b_alone(hosts, name, export)
