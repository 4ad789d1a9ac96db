"""Named keys with roles against the real stack: keys made with the CLI, owners written by the API and
the workers, agents kept to their own chats and jobs, admins seeing all, revocation at once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pandas as pd
import pytest

from tests.integration.helpers import wait_job
from tests.stack import Stack

pytestmark = pytest.mark.databases("sqlite", "postgresql")  # see tests/conftest.py

BOOTSTRAP = "integration-bootstrap-key"


def _keys(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csra.cli", "keys", *args],
                          env={**stack.env, "CSRA_API_KEY": BOOTSTRAP}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keyed(stack: Stack) -> Iterator[dict[str, httpx.Client]]:
    """A second API over the same database and Redis with keys on, and a client per key."""
    secrets = {}
    for name, role in (("alice", "agent"), ("bob", "agent"), ("lead", "admin")):
        made = _keys(stack, "create", "--name", name, "--role", role)
        assert made.returncode == 0, made.stderr
        secrets[name] = made.stdout.strip()
    with stack.serve("api-keyed", "api", "CSRA_API_PORT", "/health", (200, 503), 60, CSRA_API_KEY=BOOTSTRAP) as url:
        clients = {name: httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {secret}"})
                   for name, secret in secrets.items()}
        clients["anonymous"] = httpx.Client(base_url=url, timeout=60)
        yield clients
        for c in clients.values():
            c.close()


def test_agents_keep_to_their_own_chats_and_jobs(keyed):
    alice, bob, lead = keyed["alice"], keyed["bob"], keyed["lead"]
    chat = alice.post("/chats", json={"settings": {"max_new_tokens": 8}})
    assert chat.status_code == 201, chat.text
    cid = chat.json()["id"]
    turn = alice.post(f"/chats/{cid}/messages", json={"content": "Where is my refund?"}).json()
    job = wait_job(alice, turn["job"]["id"])
    assert job["status"] == "succeeded" and job["owner"] == "alice"
    assert alice.get(f"/chats/{cid}").json()["owner"] == "alice"

    reply_id = turn["assistant_message"]["id"]
    for method, path, body in (("GET", f"/chats/{cid}", None), ("PATCH", f"/chats/{cid}", {"title": "mine"}),
                               ("POST", f"/chats/{cid}/messages", {"content": "hello?"}),
                               ("POST", f"/chats/{cid}/messages/{reply_id}/feedback", {"rating": "down"}),
                               ("GET", f"/chats/{cid}/export", None), ("DELETE", f"/chats/{cid}", None),
                               ("GET", f"/jobs/{job['id']}", None), ("GET", f"/jobs/{job['id']}/events", None),
                               ("GET", f"/jobs/{job['id']}/stream", None), ("POST", f"/jobs/{job['id']}/cancel", None)):
        r = bob.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.status_code)  # another agent's things do not exist for bob
    assert alice.get(f"/chats/{cid}").json()["title"] != "mine"
    assert alice.get("/memory/entries").status_code == 403  # every approved turn of every chat: admins only
    assert cid not in [c["id"] for c in bob.get("/chats").json()["data"]]
    assert "Where is my refund?" not in bob.get("/chats/export", params={"format": "csv"}).text
    assert all(j["owner"] == "bob" for j in bob.get("/jobs").json()["data"])

    assert lead.get(f"/chats/{cid}").json()["owner"] == "alice"
    assert job["id"] in [j["id"] for j in lead.get("/jobs", params={"kind": "generate"}).json()["data"]]
    assert "Where is my refund?" in lead.get("/chats/export", params={"format": "csv"}).text


def test_agents_read_models_but_cannot_import_train_or_delete(keyed):
    alice = keyed["alice"]
    assert alice.get("/models").status_code == 200 and alice.get("/evaluations").status_code == 200
    for method, path, body in (("POST", "/datasets", {"name": "x", "source": "x.csv"}),
                               ("POST", "/jobs/train", {"dataset_id": 1}),
                               ("DELETE", "/models/baseline", None), ("PUT", "/profile", {}),
                               ("GET", "/datasets", None)):
        r = alice.request(method, path, json=body)
        assert r.status_code == 403 and "admin key" in r.json()["detail"], (method, path, r.text)
    assert keyed["anonymous"].get("/models").status_code == 401


def test_what_an_admin_makes_carries_their_name(keyed, stack, bitext_path):
    lead = keyed["lead"]
    small = stack.root / "imports" / "keys-small.csv"
    pd.read_csv(bitext_path).sample(120, random_state=3).to_csv(small, index=False)  # drawn: the file is sorted
    created = lead.post("/datasets", json={"name": "lead's", "source": str(small)}).json()
    assert created["dataset"]["owner"] == "lead" and created["job"]["owner"] == "lead"
    assert wait_job(lead, created["job"]["id"])["status"] == "succeeded"
    train = lead.post("/jobs/train", json={"dataset_id": created["dataset"]["id"], "epochs": 1, "batch_size": 8,
                                          "max_train_samples": 16, "max_eval_samples": 8, "output_name": "lead-ft"})
    assert train.status_code == 202, train.text
    done = wait_job(lead, train.json()["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    model = keyed["alice"].get("/models/lead-ft").json()  # the team's catalogue: agents read it
    assert model["owner"] == "lead"


def test_a_revoked_key_is_refused_at_once(keyed, stack):
    assert keyed["bob"].get("/chats").status_code == 200
    revoked = _keys(stack, "revoke", "bob")
    assert revoked.returncode == 0, revoked.stderr
    r = keyed["bob"].get("/chats")
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    listed = _keys(stack, "list", "--all")
    assert "bob" in listed.stdout and "alice" in listed.stdout and "csra_" in listed.stdout
    assert keyed["alice"].headers["Authorization"].split()[1] not in listed.stdout  # never the key itself
    assert all(len(line) < 200 for line in listed.stdout.splitlines())
