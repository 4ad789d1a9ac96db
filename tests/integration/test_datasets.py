"""Dataset import end to end over HTTP: real API, real Redis, real Celery worker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.helpers import import_path, upload, wait_job

pytestmark = pytest.mark.databases("sqlite", "postgresql")  # see tests/conftest.py


def test_health_reports_database_redis_and_workers(api):
    h = api.get("/health").json()
    assert h["database"] == "ok" and h["redis"] == "ok"
    assert h["workers"]["default"] and h["workers"]["train"]


def test_import_bitext_end_to_end(api, bitext_path):
    created = import_path(api, str(bitext_path))
    assert created["dataset"]["status"] == "importing" and created["job"]["kind"] == "import"
    job = wait_job(api, created["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"] == 1.0 and job["started_at"] and job["finished_at"]
    ds = api.get(f"/datasets/{created['dataset']['id']}").json()
    assert ds["status"] == "ready" and ds["row_count"] > 10000
    stats = ds["stats"]
    total = sum(stats["splits"].values()) if "splits" in stats else ds["row_count"]
    assert total == ds["row_count"]
    page = api.get(f"/datasets/{ds['id']}/examples", params={"split": "test", "limit": 5}).json()
    assert 400 < page["count"] < 700 and len(page["data"]) == 5
    ex = page["data"][0]
    assert {"instruction", "input", "output", "intent", "category"} <= ex.keys() and ex["split"] == "test"
    intents = {e["intent"] for offset in (0, 500)  # pages of at most 500
               for e in api.get(f"/datasets/{ds['id']}/examples",
                                params={"split": "test", "limit": 500, "offset": offset}).json()["data"]}
    assert len(intents) == 27  # stratified: every intent is in the test split
    events = api.get(f"/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events if e["kind"] == "status"][-1] == "succeeded"
    assert api.get(f"/jobs/{job['id']}/events", params={"after": events[-1]["id"]}).json()["count"] == 0


def test_upload_jsonl_and_parquet(api):
    rows = [{"instruction": "Answer the customer.", "input": f"where is my parcel number {i}?",
             "output": f"Your parcel {i} is on its way and should arrive within two days.", "intent": "track"}
            for i in range(40)]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    resp = upload(api, "support.jsonl", jsonl, name="jsonl-upload")
    assert resp.status_code == 202, resp.text
    assert wait_job(api, resp.json()["job"]["id"])["status"] == "succeeded"
    assert api.get(f"/datasets/{resp.json()['dataset']['id']}").json()["row_count"] == 40
    buf = io.BytesIO()
    pd.DataFrame(rows).rename(columns={"input": "question", "output": "answer"}).to_parquet(buf)
    resp = upload(api, "support.parquet", buf.getvalue(),
                  options=json.dumps({"column_mapping": {"input": "question", "output": "answer"}}))
    assert resp.status_code == 202, resp.text
    assert wait_job(api, resp.json()["job"]["id"])["status"] == "succeeded"


def _failed_import(api, resp) -> str:
    assert resp.status_code == 202, resp.text
    job = wait_job(api, resp.json()["job"]["id"])
    assert job["status"] == "failed"
    ds = api.get(f"/datasets/{resp.json()['dataset']['id']}").json()
    assert ds["status"] == "failed" and ds["row_count"] == 0 and ds["error"] == job["error"]
    return job["error"]


def test_missing_columns_fail_with_the_column_names(api):
    err = _failed_import(api, upload(api, "bad.csv", b"question,reply_text\nhello there,hi how can I help you today\n"))
    assert "missing" in err.lower() and "column_mapping" in err


def test_non_utf8_fails_clearly(api):
    content = "flags,instruction,category,intent,response\nB,caf\xe9 order,ORDER,x,reply text long enough\n"
    err = _failed_import(api, upload(api, "latin1.csv", content.encode("latin-1")))
    assert "utf-8" in err.lower()


def test_broken_quote_fails_clearly(api):
    content = b'flags,instruction,category,intent,response\nB,"unterminated,ORDER,x,some reply here\n'
    err = _failed_import(api, upload(api, "quote.csv", content))
    assert "quote" in err.lower() or "line" in err.lower()


def test_empty_files_and_bad_requests_are_4xx(api, stack):
    r = upload(api, "empty.csv", b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = upload(api, "notes.txt", b"hello")
    assert r.status_code == 415 and ".csv" in r.json()["detail"]
    r = api.post("/datasets", json={"name": "x", "source": "/etc/passwd"})
    assert r.status_code == 403 and "outside the allowed import folders" in r.json()["detail"]
    r = api.post("/datasets", json={"name": "x", "source": str(stack.root / "imports" / "nope.csv")})
    assert r.status_code == 422 and "no file" in r.json()["detail"]
    r = api.post("/datasets", json={"name": "x", "source": "x.csv", "options": {"train_fraction": 0.5}})
    assert r.status_code == 422
    r = api.post("/datasets", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    header_only = b"flags,instruction,category,intent,response\n"
    _failed_import(api, upload(api, "header.csv", header_only))


def test_upload_over_the_limit_is_413_and_leaves_nothing(api, stack):
    before = api.get("/datasets").json()["count"]
    big = b"flags,instruction,category,intent,response\n" + b"B,x,ORDER,i,y\n" * 200_000  # ~2.8 MB > 2 MB
    r = upload(api, "big.csv", big)
    assert r.status_code == 413 and "CSRA_MAX_UPLOAD_MB" in r.json()["detail"]
    assert api.get("/datasets").json()["count"] == before
    uploads = Path(stack.env["CSRA_DATA_DIR"]) / "uploads"
    assert not any(p.name == "big.csv" for p in uploads.rglob("*"))


def test_server_side_import_from_an_allowed_root(api, stack):
    path = stack.root / "imports" / "mine.csv"
    path.write_text("customer,agent\n" + "\n".join(
        f"my order {i} has not arrived yet,I am sorry to hear that order {i} is late; let me check it for you."
        for i in range(30)))
    created = import_path(api, str(path), column_mapping={"input": "customer", "output": "agent"})
    job = wait_job(api, created["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["rows"] == 30
