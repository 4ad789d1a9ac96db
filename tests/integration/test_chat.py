"""Generation, chats, profile placeholders and exports against the real stack (tiny baseline)."""

from __future__ import annotations

import csv
import io
import json
import threading

import httpx
import pytest

from tests.integration.helpers import train_scripted, wait_job

pytestmark = pytest.mark.databases("sqlite", "postgresql")  # see tests/conftest.py


def _generate(api, **params) -> dict:
    r = api.post("/jobs/generate", json={"model_id": "baseline", "max_new_tokens": 12, **params})
    assert r.status_code == 202, r.text
    return r.json()


def test_generate_job_returns_text_tokens_and_latency(api):
    job = _generate(api, message="Where is my order?", tone="friendly", seed=1)
    assert job["queue"] == "generate"
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done["error"]
    r = done["result"]
    assert r["model"] == "baseline" and r["completion_tokens"] >= 1 and r["prompt_tokens"] > 5
    assert r["latency_ms"] > 0 and r["finish_reason"] in ("stop", "length") and isinstance(r["text"], str)


SCRIPTED_REPLY = "Your order {{Order Number}} is cancelled."


@pytest.fixture(scope="module")
def scripted(stack) -> str:
    """A tiny model fine-tuned (through the API, seconds) to always answer SCRIPTED_REPLY: real text,
    with a placeholder, so streaming, batching and placeholder filling are checked on words."""
    with httpx.Client(base_url=stack.url, timeout=30) as api:
        return train_scripted(api, "tiny-scripted", SCRIPTED_REPLY)


def _stream(url: str, job_id: int) -> tuple[list[str], dict | None]:
    tokens, done = [], None
    with httpx.stream("GET", f"{url}/jobs/{job_id}/stream", timeout=60) as resp:
        assert resp.status_code == 200
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "token":
                tokens.append(json.loads(line[5:])["text"])
            elif line.startswith("data:") and event == "done":
                done = json.loads(line[5:])
                break
    return tokens, done


def test_greedy_generation_is_deterministic_and_streams(api, stack, scripted):
    ask = {"model_id": scripted, "message": "I want to cancel my order", "seed": 3, "max_new_tokens": 24}
    first = wait_job(api, _generate(api, **ask)["id"])
    job = _generate(api, **ask)
    tokens, done = _stream(stack.url, job["id"])
    assert done is not None and done["status"] == "succeeded"
    assert len(tokens) > 3  # it streamed piece by piece
    assert "".join(tokens).strip() == done["result"]["raw_text"] == first["result"]["raw_text"]
    assert done["result"]["raw_text"].startswith("Your order {{Order Number}} is cancelled")


def test_concurrent_requests_are_batched_with_identical_greedy_text(api, stack, scripted):
    message = "cancel my order, please"
    alone = wait_job(api, _generate(api, model_id=scripted, message=message, max_new_tokens=16)["id"])
    ids: list[int] = []

    def submit(i: int) -> None:
        with httpx.Client(base_url=stack.url, timeout=30) as c:
            ids.append(c.post("/jobs/generate", json={"model_id": scripted, "max_new_tokens": 16,
                                                      "message": message if i == 0
                                                      else f"Question number {i} about my account"}).json()["id"])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [wait_job(api, i) for i in ids]
    assert all(r["status"] == "succeeded" for r in results)
    assert max(r["result"]["batch_size"] for r in results) > 1  # they really were decoded together
    assert alone["result"]["batch_size"] == 1
    same = [r for r in results if r["params"]["message"] == message]
    assert same[0]["result"]["raw_text"] == alone["result"]["raw_text"] and alone["result"]["raw_text"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [({"message": "   "}, 422, "empty"), ({"message": "x" * 5000}, 422, "CSRA_MAX_MESSAGE_CHARS"),
     ({"message": "hi", "model_id": "nope"}, 422, "unknown model"),
     ({"message": "hi", "temperature": 3}, 422, "temperature"), ({"message": "hi", "top_p": 0}, 422, "top_p")],
)
def test_bad_generation_requests(api, body, status, needle):
    r = api.post("/jobs/generate", json=body)
    assert r.status_code == status and needle in json.dumps(r.json()["detail"]), r.text


def test_chat_stores_turns_fills_placeholders_and_exports(api, scripted):
    api.put("/profile", json={"company_name": "Acme", "website_url": "https://acme.example",
                              "custom_slots": {"Order Number": "#42"}})
    chat = api.post("/chats", json={"title": "New chat", "settings": {"max_new_tokens": 24, "tone": "neutral",
                                                                      "model_id": scripted}})
    assert chat.status_code == 201, chat.text
    cid = chat.json()["id"]
    accepted = api.post(f"/chats/{cid}/messages", json={"content": "Cancel order {{Order Number}} please"})
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["assistant_message"]["status"] == "pending" and body["user_message"]["role"] == "user"
    wait_job(api, body["job"]["id"])
    second = api.post(f"/chats/{cid}/messages", json={"content": "thanks!", "tone": "friendly"}).json()
    wait_job(api, second["job"]["id"])
    full = api.get(f"/chats/{cid}").json()
    roles = [m["role"] for m in full["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    reply = full["messages"][1]
    assert reply["status"] == "done" and reply["model_name"] == scripted and reply["completion_tokens"] >= 1
    # the agent sees the profile's value; the model's own words keep the placeholder
    assert reply["content"].startswith("Your order #42 is cancelled"), reply["content"]
    assert reply["raw_content"].startswith("Your order {{Order Number}} is cancelled")
    assert full["messages"][3]["settings"]["tone"] == "friendly"
    assert full["title"].startswith("Cancel order")
    # the second turn saw the first as history, in the model's own words
    gen = api.get(f"/jobs/{second['job']['id']}").json()
    assert [m["role"] for m in gen["params"]["messages"]] == ["user", "assistant", "user"]
    assert gen["params"]["messages"][1]["content"] == reply["raw_content"]
    fb = api.post(f"/chats/{cid}/messages/{reply['id']}/feedback",
                  json={"rating": "down", "corrected_reply": "Done, order #42 is cancelled."})
    assert fb.status_code == 200 and fb.json()["feedback"] == "down"

    jsonl = api.get(f"/chats/{cid}/export", params={"format": "jsonl"})
    assert jsonl.status_code == 200 and "attachment" in jsonl.headers["content-disposition"]
    msgs = json.loads(jsonl.text.splitlines()[0])["messages"]
    assert msgs[0]["role"] == "system" and msgs[1]["content"] == "Cancel order {{Order Number}} please"
    assert msgs[2]["content"] == "Done, order #42 is cancelled."  # the correction replaces the model's reply
    rows = list(csv.DictReader(io.StringIO(api.get(f"/chats/{cid}/export", params={"format": "csv"}).text)))
    assert len(rows) == 4 and rows[0]["role"] == "user"
    txt = api.get(f"/chats/{cid}/export", params={"format": "txt"}).text
    assert "--- Turn 1 ---" in txt and "--- Turn 2 ---" in txt
    assert "**Turn 1 - Customer:**" in api.get(f"/chats/{cid}/export", params={"format": "md"}).text
    assert api.get(f"/chats/{cid}/export", params={"format": "pdf"}).status_code == 422
    everything = api.get("/chats/export", params={"format": "jsonl", "model": scripted})
    assert any(json.loads(line)["metadata"]["chat_id"] == cid for line in everything.text.splitlines())


def test_placeholders_are_filled_from_the_profile():
    from csra.profile import Profile, fill_placeholders

    p = Profile(company_name="Acme", custom_slots={"Order Number": "#42"})
    text = "Visit {{Company Name}} about {{ order number }}; call {{Customer Support Phone Number}}."
    assert fill_placeholders(text, p) == "Visit Acme about #42; call {{Customer Support Phone Number}}."


def test_chat_errors_and_deletion(api):
    assert api.post("/chats/999999/messages", json={"content": "hi"}).status_code == 404
    assert api.post("/chats", json={"settings": {"model_id": "ghost"}}).status_code == 422
    cid = api.post("/chats", json={}).json()["id"]
    assert api.post(f"/chats/{cid}/messages", json={"content": " "}).status_code == 422
    assert api.post(f"/chats/{cid}/messages", json={"content": "hi", "temperature": 9}).status_code == 422
    assert api.get(f"/chats/{cid}").json()["messages"] == []  # nothing half-written
    assert api.delete(f"/chats/{cid}").status_code == 204
    assert api.get(f"/chats/{cid}").status_code == 404


def test_failed_generation_leaves_a_visible_error(api, stack):
    import shutil

    created = api.post("/jobs/train", json={"dataset_id": _dataset(api), "max_train_samples": 8, "epochs": 1,
                                            "output_name": "doomed"})
    assert wait_job(api, created.json()["id"], timeout=180)["status"] == "succeeded"
    cid = api.post("/chats", json={"settings": {"model_id": "doomed", "max_new_tokens": 8}}).json()["id"]
    shutil.rmtree(stack.root / "data" / "models" / "doomed")  # the model vanishes from disk
    sent = api.post(f"/chats/{cid}/messages", json={"content": "hello there"}).json()
    job = wait_job(api, sent["job"]["id"])
    assert job["status"] == "failed"
    msgs = api.get(f"/chats/{cid}").json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["status"] == "failed" and msgs[1]["error"]

    # the model is deleted through the API while the chat still names it: a clear 422, nothing stored
    assert api.delete("/models/doomed").status_code == 204
    gone = api.post(f"/chats/{cid}/messages", json={"content": "anyone there?"})
    assert gone.status_code == 422 and "no longer exists" in gone.json()["detail"], gone.text
    assert len(api.get(f"/chats/{cid}").json()["messages"]) == 2
    # switching the chat to another model (PATCH) lets the conversation go on
    patched = api.patch(f"/chats/{cid}", json={"title": "Renamed", "settings": {"model_id": "baseline",
                                                                                "max_new_tokens": 4}})
    assert patched.status_code == 200 and patched.json()["settings"]["model_id"] == "baseline", patched.text
    assert api.patch(f"/chats/{cid}", json={"settings": {"model_id": "doomed"}}).status_code == 422
    again = api.post(f"/chats/{cid}/messages", json={"content": "anyone there?"})
    assert again.status_code == 202 and wait_job(api, again.json()["job"]["id"])["status"] == "succeeded"
    assert api.get(f"/chats/{cid}").json()["title"] == "Renamed"


def _dataset(api) -> int:
    rows = "\n".join(f"my order {i} is late,I am sorry your order {i} is late; I will check it right away."
                     for i in range(40))
    r = api.post("/datasets", files={"file": ("small.csv", f"customer,agent\n{rows}".encode())},
                 data={"options": json.dumps({"column_mapping": {"input": "customer", "output": "agent"}})})
    assert r.status_code == 202, r.text
    assert wait_job(api, r.json()["job"]["id"])["status"] == "succeeded"
    return r.json()["dataset"]["id"]
