"""The official openai client against csra's OpenAI-compatible endpoints."""

from __future__ import annotations

import json

import openai
import pytest

from tests.integration.helpers import wait_job


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused-without-CSRA_API_KEY", max_retries=0)


def test_models_and_chat_completion(client):
    assert "baseline" in [m.id for m in client.models.list().data]
    resp = client.chat.completions.create(model="baseline", max_tokens=10, seed=2,
                                          messages=[{"role": "system", "content": "ignored: csra sets the system"},
                                                    {"role": "user", "content": "Where is my package?"}])
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens >= 1 and resp.choices[0].finish_reason in ("stop", "length")
    again = client.chat.completions.create(model="baseline", max_tokens=10, seed=2,
                                           messages=[{"role": "user", "content": "Where is my package?"}])
    assert again.choices[0].message.content == resp.choices[0].message.content


def test_streaming_chat_completion(client):
    plain = client.chat.completions.create(model="baseline", max_tokens=10,
                                           messages=[{"role": "user", "content": "I want a refund"}])
    stream = client.chat.completions.create(model="baseline", max_tokens=10, stream=True,
                                            messages=[{"role": "user", "content": "I want a refund"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_unknown_model_is_a_clear_error(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert "unknown model" in json.dumps(err.value.body)


def test_fine_tuning_jobs_surface(client, api):
    rows = "\n".join(json.dumps({"instruction": "Answer.", "input": f"refund for order {i}?",
                                 "output": f"Your refund for order {i} is on its way, thank you."}) for i in range(30))
    created = api.post("/datasets", files={"file": ("ft.jsonl", rows.encode())}).json()
    assert wait_job(api, created["job"]["id"])["status"] == "succeeded"
    ds = created["dataset"]["id"]
    job = client.fine_tuning.jobs.create(model="baseline", training_file=f"ds-{ds}", suffix="oai",
                                         hyperparameters={"n_epochs": 1, "batch_size": 8})
    assert job.status in ("queued", "running") and job.id.startswith("ftjob-")
    csra_id = int(job.id.removeprefix("ftjob-"))
    wait_job(api, csra_id, timeout=180)
    got = client.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "succeeded" and got.fine_tuned_model == "ft-oai" and got.trained_tokens > 0
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50).data]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" for e in events) and any("succeeded" in e.message for e in events)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)  # already finished
    with pytest.raises(openai.UnprocessableEntityError):
        client.fine_tuning.jobs.create(model="baseline", training_file="file-abc")
    queued = client.fine_tuning.jobs.create(model="baseline", training_file=f"ds-{ds}",
                                            hyperparameters={"n_epochs": 30})
    cancelled = client.fine_tuning.jobs.cancel(queued.id)
    assert cancelled.status in ("cancelled", "running", "queued")
    assert wait_job(api, int(queued.id.removeprefix("ftjob-")), timeout=120)["status"] == "cancelled"
