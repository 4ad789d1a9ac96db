"""The API's validation and error paths, in process (FastAPI's TestClient over a real migrated
SQLite database; Redis points at a closed port, so every submission must answer 503 and leave
nothing behind). The real-process integration tests cover what needs workers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.fixture()
def client(make_client) -> TestClient:  # type: ignore[no-untyped-def]
    return make_client()


def _add(*rows: Any) -> list[int]:
    from db.session import session_scope

    with session_scope() as s:
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _model(name: str = "baseline") -> int:
    from db.models import Model

    return _add(Model(name=name, kind="base", path=f"/nowhere/{name}"))[0]


def _job(status: str = "succeeded", kind: str = "import", params: dict[str, Any] | None = None) -> int:
    from db.models import Job

    return _add(Job(kind=kind, queue="default", status=status, params=params or {}, stage=status))[0]


def _count(model: Any) -> int:
    from sqlalchemy import func, select

    from db.session import session_scope

    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize("path", [
    "/jobs/999", "/jobs/999/events", "/datasets/999", "/datasets/999/examples", "/models/ghost", "/models/999",
    "/chats/999", "/chats/999/export", "/evaluations/999", "/evaluations/999/examples", "/evaluations/999/report",
    "/v1/fine_tuning/jobs/ftjob-999", "/v1/fine_tuning/jobs/nonsense",
])
def test_unknown_ids_are_404_with_a_detail(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404 and r.json()["detail"], (path, r.text)


@pytest.mark.parametrize(("body", "needle"), [
    ({}, "exactly one of 'message' or 'messages'"),
    ({"message": "  "}, "empty"),
    ({"message": "hi", "temperature": 2.5}, "temperature"),
    ({"message": "hi", "top_p": 0}, "top_p"),
    ({"message": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"message": "hi", "tone": "sarcastic"}, "tone"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "end with a user message"),
    ({"message": "hi", "model_id": "ghost"}, "unknown model"),
    ({"message": "hi", "reply_to": {"chat_id": 1, "message_id": 1}}, "reply_to"),  # only chat routes set it
    ({"message": "x" * 5000}, "CSRA_MAX_MESSAGE_CHARS"),
])
def test_bad_generation_requests_are_422(client: TestClient, body: dict[str, Any], needle: str) -> None:
    _model()
    r = client.post("/jobs/generate", json=body)
    assert r.status_code == 422 and needle in str(r.json()["detail"]), r.text


def test_submissions_answer_503_while_redis_is_down_and_create_nothing(client: TestClient) -> None:
    from db.models import ChatMessage, Dataset, Job

    _model()
    r = client.post("/jobs/generate", json={"message": "hi"})
    assert r.status_code == 503 and "Redis" in r.json()["detail"] and "not created" in r.json()["detail"]
    chat = client.post("/chats", json={"title": "t"})
    assert chat.status_code == 201, chat.text
    sent = client.post(f"/chats/{chat.json()['id']}/messages", json={"content": "where is my order?"})
    assert sent.status_code == 503
    assert client.get(f"/chats/{chat.json()['id']}").json()["messages"] == []  # no half-written turn
    assert _count(Job) == 0 and _count(ChatMessage) == 0 and _count(Dataset) == 0


def test_training_checks_before_a_job_exists(client: TestClient) -> None:
    r = client.post("/jobs/train", json={"dataset_id": 999})
    assert r.status_code == 422 and "does not exist" in r.json()["detail"]
    r = client.post("/jobs/train", json={"dataset_id": 1, "learning_rate": 0})
    assert r.status_code == 422 and "learning_rate" in str(r.json()["detail"])
    assert client.post("/jobs/sweep", json={"dataset_id": 1}).status_code == 422  # no configs, no grid
    big = {"dataset_id": 1, "grid": {"learning_rate": [1e-4] * 6, "batch_size": [8] * 6}}
    r = client.post("/jobs/sweep", json=big)
    assert r.status_code == 422 and "at most 32" in str(r.json()["detail"])
    r = client.post("/jobs/evaluate", json={"model_ids": ["baseline"], "dataset_id": 999})
    assert r.status_code == 422 and "does not exist" in r.json()["detail"]


def test_cancel_of_a_finished_job_is_409_and_stream_only_for_generations(client: TestClient) -> None:
    done = _job("succeeded")
    r = client.post(f"/jobs/{done}/cancel")
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]
    r = client.get(f"/jobs/{done}/stream")
    assert r.status_code == 422 and "only generation jobs stream" in r.json()["detail"]
    assert client.get(f"/jobs/{done}").json()["finished"] is True
    assert client.get(f"/jobs/{_job('queued')}").json()["finished"] is False


def test_cancelling_a_queued_job_ends_it_at_once(client: TestClient) -> None:
    queued = _job("queued")
    r = client.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished"]
    events = [e["message"] for e in client.get(f"/jobs/{queued}/events").json()["data"]]
    assert events == ["cancelled"]


def test_a_model_in_use_cannot_be_deleted(client: TestClient) -> None:
    _model("busy")
    _job("running", kind="generate", params={"model_id": "busy"})
    r = client.delete("/models/busy")
    assert r.status_code == 409 and "in use" in r.json()["detail"]
    _model("idle")
    assert client.delete("/models/idle").status_code == 204
    assert client.get("/models/idle").status_code == 404


def test_dataset_sources_are_checked(client: TestClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/datasets", json={"name": "x", "source": "/etc/passwd"})
    assert r.status_code == 403 and "CSRA_IMPORT_ROOTS" in r.json()["detail"]
    r = client.post("/datasets", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/datasets", files={"file": ("rows.exe", b"MZ")})
    assert r.status_code == 415


def test_evaluation_examples_check_the_pattern(client: TestClient) -> None:
    from db.models import Evaluation

    (ev,) = _add(Evaluation(split="test", params={}, metrics={}, status="succeeded"))
    r = client.get(f"/evaluations/{ev}/examples", params={"pattern": "bogus"})
    assert r.status_code == 422 and "unknown pattern" in r.json()["detail"]
    assert client.get(f"/evaluations/{ev}/examples").json() == {"count": 0, "data": []}
    assert client.get(f"/evaluations/{ev}/..%2Fcsra.db").status_code == 404


def test_openai_surface_errors(client: TestClient) -> None:
    _model()
    r = client.post("/v1/chat/completions", json={"model": "baseline",
                                                  "messages": [{"role": "assistant", "content": "hi"}]})
    assert r.status_code == 422 and "end with a user message" in r.json()["detail"]
    r = client.post("/v1/fine_tuning/jobs", json={"training_file": "file-abc"})
    assert r.status_code == 422 and "dataset id" in r.json()["detail"]
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"retrieval", "retrieval-consensus",
                                                                           "baseline"}
