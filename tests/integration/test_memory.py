"""The answer memory against the real stack: rebuild, search, the retrieval responder, approvals."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from ml.memory.grounding import by_consensus
from tests.integration.helpers import wait_job
from tests.stack import Stack

pytestmark = pytest.mark.databases("sqlite", "postgresql")  # see tests/conftest.py

INTENTS = {
    "cancel_order": ("I want to cancel order {n}", "Order {{{{Order Number}}}} is cancelled; reference C{n}."),
    "track_refund": ("where is the refund for purchase {n}", "Refunds reach your account in 5 days; ticket R{n}."),
    "change_password": ("how can I reset my password {n}", "Use the reset link on {{{{Website URL}}}}; case P{n}."),
}


def import_intents_dataset(api: httpx.Client) -> int:
    """A small dataset with intents (60 rows, three intents), imported through the API."""
    rows = [(m.format(n=n), r.format(n=n), intent) for intent, (m, r) in INTENTS.items() for n in range(20)]
    body = "customer,agent,label\n" + "\n".join(f'"{m}","{r}",{i}' for m, r, i in rows)
    options = {"column_mapping": {"input": "customer", "output": "agent", "intent": "label"}}
    r = api.post("/datasets", files={"file": ("memory.csv", body.encode())}, data={"options": json.dumps(options)})
    assert r.status_code == 202, r.text
    assert wait_job(api, r.json()["job"]["id"])["status"] == "succeeded"
    return int(r.json()["dataset"]["id"])


def ensure_memory(api: httpx.Client) -> None:
    """The answer memory holds something (the small dataset's answers) for tests that only use it."""
    if api.get("/memory").json()["entries"] == 0:
        _rebuild(api, import_intents_dataset(api))


@pytest.fixture(scope="module")
def memory_dataset(stack) -> int:
    return import_intents_dataset(httpx.Client(base_url=stack.url, timeout=30))


def _rebuild(api: httpx.Client, dataset_id: int) -> dict:
    job = api.post("/memory/rebuild", json={"dataset_id": dataset_id})
    assert job.status_code == 202, job.text
    done = wait_job(api, job.json()["id"], timeout=240)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_memory_is_built_searched_and_answers_as_a_responder(api, memory_dataset):
    if api.get("/memory").json()["entries"] == 0:  # nothing built yet: a clear 409 that says how
        r = api.get("/memory/search", params={"q": "cancel my order"})
        assert r.status_code == 409 and "POST /memory/rebuild" in r.json()["detail"], r.text

    done = _rebuild(api, memory_dataset)
    train_rows = api.get(f"/datasets/{memory_dataset}").json()["stats"]["split_rows"]["train"]
    assert done["result"]["entries"] == train_rows > 30
    stats = api.get("/memory").json()
    assert stats["embedder_ready"] and memory_dataset in stats["datasets"] and stats["by_source"]["dataset"] >= 30

    found = api.get("/memory/search", params={"q": "please cancel my order 7", "k": 3}).json()
    assert found["intent"] == "cancel_order" and found["intent_confidence"] > 0.5
    assert len(found["data"]) == 3 and all(h["source"] == "dataset" for h in found["data"])
    top = found["data"][0]
    assert top["intent"] == "cancel_order" and 0.5 < top["similarity"] <= 1.0001 and "cancelled" in top["reply"]
    assert [h["similarity"] for h in found["data"]] == sorted((h["similarity"] for h in found["data"]),
                                                              reverse=True)

    # a rebuild replaces the dataset's answers (no duplicates), and the old ones stop being found
    again = _rebuild(api, memory_dataset)
    assert again["result"]["replaced"] == train_rows
    assert api.get("/memory").json()["by_source"]["dataset"] == stats["by_source"]["dataset"]

    # the retrieval responder: the nearest approved answer, no model
    r = api.post("/jobs/generate", json={"model_id": "retrieval", "message": "I need to reset my password"})
    assert r.status_code == 202, r.text
    reply = wait_job(api, r.json()["id"])
    assert reply["status"] == "succeeded", reply["error"]
    result = reply["result"]
    assert result["finish_reason"] == "retrieval" and "reset link" in result["raw_text"]
    assert result["intent"] == "change_password" and len(result["similar"]) == 3
    assert result["slot_warnings"] == []
    assert "retrieval" in [m["id"] for m in api.get("/v1/models").json()["data"]]
    builtin = {m["name"]: m for m in api.get("/models").json()["data"] if m["kind"] == "retrieval"}
    assert builtin["retrieval-consensus"]["training_config"] == {"consensus_pool": 8}

    # the consensus responder: of the 8 nearest answers of the nearest one's intent, the one the others share most
    message = "I need to reset my password"
    pool = api.get("/memory/search", params={"q": message, "k": 8}).json()["data"]
    same = [h for h in pool if h["intent"] == pool[0]["intent"]]
    want = same[by_consensus([h["reply"] for h in same])[0]]
    done = wait_job(api, api.post("/jobs/generate", json={"model_id": "retrieval-consensus", "message": message}
                                  ).json()["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["raw_text"] == want["reply"] and done["result"]["memory_entry_id"] == want["id"]
    assert [s["entry_id"] for s in done["result"]["similar"] if s["grounded"]] == [want["id"]]
    assert api.delete("/models/retrieval-consensus").status_code == 409  # built in


@pytest.mark.parametrize(("params", "needle"), [({"q": "   "}, "empty"), ({"q": "hi", "k": 0}, "k"),
                                                ({"q": "hi", "k": 51}, "k"), ({}, "q")])
def test_bad_searches_are_422(api, params, needle):
    r = api.get("/memory/search", params=params)
    assert r.status_code == 422 and needle in json.dumps(r.json()["detail"]), r.text


def test_bad_rebuilds_are_4xx_and_the_memory_stays(api, memory_dataset):
    _rebuild(api, memory_dataset) if api.get("/memory").json()["entries"] == 0 else None
    before = api.get("/memory").json()
    assert api.post("/memory/rebuild", json={"dataset_id": 999999}).status_code == 422
    assert api.post("/memory/rebuild", json={"dataset_id": "x"}).status_code == 422
    assert api.post("/memory/rebuild", json={}).status_code == 422
    assert api.get("/memory").json() == before
    # one rebuild of a dataset at a time: a second one while the first runs is a 409 naming it
    first = api.post("/memory/rebuild", json={"dataset_id": memory_dataset})
    second = api.post("/memory/rebuild", json={"dataset_id": memory_dataset})
    assert first.status_code == 202, first.text
    assert second.status_code == 409 and f"job {first.json()['id']}" in second.json()["detail"], second.text
    assert wait_job(api, first.json()["id"], timeout=240)["status"] == "succeeded"
    assert api.delete("/models/retrieval").status_code in (409, 422)
    assert api.post("/jobs/train", json={"base_model": "retrieval", "dataset_id": memory_dataset}).status_code == 422


def _search(api: httpx.Client, q: str) -> list[dict]:
    return api.get("/memory/search", params={"q": q, "k": 3}).json()["data"]


def test_an_approved_correction_is_found_at_once_and_can_be_removed(api, memory_dataset, stack, db_env):
    if api.get("/memory").json()["entries"] == 0:
        _rebuild(api, memory_dataset)
    question = "my parcel arrived broken, what now?"
    cid = api.post("/chats", json={"settings": {"model_id": "retrieval"}}).json()["id"]
    sent = api.post(f"/chats/{cid}/messages", json={"content": question}).json()
    assert wait_job(api, sent["job"]["id"])["status"] == "succeeded"
    reply = api.get(f"/chats/{cid}").json()["messages"][1]
    assert reply["intent"] in INTENTS and reply["intent_confidence"] is not None
    assert len(reply["similar"]) == 3 and reply["similar"][0]["similarity"] >= reply["similar"][1]["similarity"]

    corrected = "Sorry about the damage: send a photo to {{Customer Support Email}} and we replace it."
    fb = api.post(f"/chats/{cid}/messages/{reply['id']}/feedback",
                  json={"rating": "down", "corrected_reply": corrected})
    assert fb.status_code == 200, fb.text
    entry_id = fb.json()["memory_entry_id"]
    assert entry_id is not None
    started = time.monotonic()
    hits = _search(api, question)
    assert hits[0]["id"] == entry_id and hits[0]["reply"] == corrected and hits[0]["source"] == "chat"
    assert time.monotonic() - started < 5

    # the generate worker sees it too (its copy of the memory syncs from the database)
    again = api.post(f"/chats/{cid}/messages", json={"content": question}).json()
    assert wait_job(api, again["job"]["id"])["status"] == "succeeded"
    second = api.get(f"/chats/{cid}").json()["messages"][3]
    assert second["raw_content"] == corrected and second["similar"][0]["entry_id"] == entry_id

    # a later 👍 without text approves the correction, not the reply it replaced
    up = api.post(f"/chats/{cid}/messages/{reply['id']}/feedback", json={"rating": "up"})
    assert up.status_code == 200 and up.json()["memory_entry_id"] not in (None, entry_id), up.text
    assert _search(api, question)[0]["reply"] == corrected
    entry_id = up.json()["memory_entry_id"]

    listed = api.get("/memory/entries", params={"source": "chat"}).json()
    assert entry_id in [e["id"] for e in listed["data"]]
    assert api.delete(f"/memory/entries/{entry_id}").status_code == 204
    twice = api.delete(f"/memory/entries/{entry_id}")
    assert twice.status_code == 404 and "already removed" in twice.json()["detail"]
    assert api.delete("/memory/entries/99999999").status_code == 404
    assert entry_id not in [h["id"] for h in _search(api, question)]
    assert api.get(f"/chats/{cid}").json()["messages"][1]["memory_entry_id"] is None

    # a reply that failed cannot be approved as it is (only corrected)
    from db.models import ChatMessage
    from db.session import session_scope

    with session_scope() as s:
        s.get(ChatMessage, second["id"]).status = "failed"
    up = api.post(f"/chats/{cid}/messages/{second['id']}/feedback", json={"rating": "up"})
    assert up.status_code == 409 and "failed" in up.json()["detail"], up.text
    assert api.get("/memory").json()["by_source"].get("chat", 0) == 0


def test_a_grounded_model_is_trained_served_and_evaluated_on_its_exemplars(api, memory_dataset):
    grounding = {"k": 2, "max_exemplar_tokens": 24}
    too_short = api.post("/jobs/train", json={"dataset_id": memory_dataset, "grounding": grounding,
                                              "max_input_length": 64})
    assert too_short.status_code == 422 and "max_input_length" in json.dumps(too_short.json()["detail"])
    bad = api.post("/jobs/train", json={"dataset_id": memory_dataset, "grounding": {"template": "no marker"}})
    assert bad.status_code == 422 and "{exemplars}" in json.dumps(bad.json()["detail"])

    job = api.post("/jobs/train", json={"dataset_id": memory_dataset, "epochs": 1, "batch_size": 8,
                                        "max_input_length": 256, "grounding": grounding,
                                        "output_name": "tiny-grounded"})
    assert job.status_code == 202, job.text
    trained = wait_job(api, job.json()["id"], timeout=300)
    assert trained["status"] == "succeeded", trained["error"]
    model = api.get("/models/tiny-grounded").json()
    assert model["training_config"]["grounding"]["k"] == 2

    # chat and /v1 ground it the same way: the memory's answers are in its prompt
    if api.get("/memory").json()["entries"] == 0:
        _rebuild(api, memory_dataset)
    gen = api.post("/jobs/generate", json={"model_id": "tiny-grounded", "message": "cancel order 3 please",
                                           "max_new_tokens": 4})
    done = wait_job(api, gen.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["grounded"] is True and done["result"]["intent"] == "cancel_order"
    # a copy bias far above the tiny model's logits writes the exemplars' own words (the k=2 nearest answers)
    copied = api.post("/jobs/generate", json={"model_id": "tiny-grounded", "message": "cancel order 3 please",
                                              "max_new_tokens": 4, "copy_bias": 20})
    done = wait_job(api, copied.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    text, used = done["result"]["raw_text"], done["result"]["grounded_on"]
    nearest = {h["id"]: h["reply"] for h in api.get("/memory/search", params={
        "q": "cancel order 3 please", "k": 8}).json()["data"]}
    assert len(used) == 2 and set(used) <= set(nearest)  # k=2 of the 8 nearest, chosen by their consensus
    assert text and any(text in nearest[i] for i in used), (text, used, nearest)
    # the approved answer it follows (the first exemplar) is suggested whole: not cut at max_new_tokens 4
    assert text == nearest[used[0]].strip() and done["result"]["finish_reason"] == "stop", (text, used, nearest)
    assert done["result"]["completion_tokens"] > 4
    # the agent sees the 3 nearest answers and every one the reply stood on, those marked
    shown = done["result"]["similar"]
    assert {s["entry_id"] for s in shown if s["grounded"]} == set(used)
    assert [s["entry_id"] for s in shown[:3]] == list(nearest)[:3]
    assert done["result"]["follows_approved"] is True
    # a message unlike any approved one: its exemplars are in the prompt, but the reply is not held to them
    off = "What will the weather be like in Paris tomorrow afternoon?"
    assert api.get("/memory/search", params={"q": off, "k": 1}).json()["data"][0]["similarity"] < 0.5
    unlike = wait_job(api, api.post("/jobs/generate", json={"model_id": "tiny-grounded", "message": off,
                                                            "max_new_tokens": 4, "copy_bias": 20}).json()["id"])
    assert unlike["status"] == "succeeded", unlike["error"]
    assert unlike["result"]["follows_approved"] is False and len(unlike["result"]["grounded_on"]) == 2
    assert unlike["result"]["completion_tokens"] <= 4  # the model's own words keep the caller's limit
    far = {h["id"]: h["reply"] for h in api.get("/memory/search", params={"q": off, "k": 8}).json()["data"]}
    own = unlike["result"]["raw_text"]  # the random tiny model's own words (here it may say nothing at all)
    assert not any(own and far[i].startswith(own) for i in unlike["result"]["grounded_on"]), (own, far)
    # a chat turn keeps which it was, so the agent is told when a suggestion is the model's own words
    cid = api.post("/chats", json={"settings": {"model_id": "tiny-grounded", "max_new_tokens": 4}}).json()["id"]
    for content in (off, "cancel order 3 please"):
        sent = api.post(f"/chats/{cid}/messages", json={"content": content}).json()
        assert wait_job(api, sent["job"]["id"])["status"] == "succeeded"
    turns = api.get(f"/chats/{cid}").json()["messages"]
    assert [m["follows_approved"] for m in turns] == [None, False, None, True]
    too_big = api.post("/jobs/generate", json={"model_id": "tiny-grounded", "message": "hi", "copy_bias": 21})
    assert too_big.status_code == 422 and "copy_bias" in json.dumps(too_big.json()["detail"])
    one = api.post("/jobs/generate", json={"model_id": "tiny-grounded", "message": "hi", "no_repeat_ngram_size": 1})
    assert one.status_code == 422 and "no_repeat_ngram_size" in json.dumps(one.json()["detail"])

    ev = api.post("/jobs/evaluate", json={"model_ids": ["retrieval", "retrieval-consensus", "tiny-grounded"],
                                          "dataset_id": memory_dataset, "max_new_tokens": 4})
    assert ev.status_code == 202, ev.text
    finished = wait_job(api, ev.json()["id"], timeout=300)
    assert finished["status"] == "succeeded", finished["error"]
    metrics = api.get(f"/evaluations/{finished['result']['evaluation_id']}").json()["metrics"]
    # the nearest training answer of each test message: right intent, its own words (no foreign slots)
    assert metrics["retrieval"]["overall"]["intent_match"] == 1.0
    assert metrics["retrieval"]["overall"]["slots_outside_contract"] == 0.0
    assert metrics["retrieval"]["overall"]["rouge_l"] > 0.3
    # the consensus responder: an approved answer of the nearest one's intent, so no foreign slots either
    assert metrics["retrieval-consensus"]["backend"] == "retrieval"
    assert metrics["retrieval-consensus"]["overall"]["slots_outside_contract"] == 0.0
    assert metrics["retrieval-consensus"]["overall"]["rouge_l"] > 0.3
    assert metrics["tiny-grounded"]["overall"]["intent_match"] is not None
    assert metrics["tiny-grounded"]["grounding"]["k"] == 2 and metrics["retrieval"]["grounding"] is None
    assert metrics["tiny-grounded"]["grounding"]["length_floor"] == model["training_config"]["grounding"].get(
        "length_floor", 0.0)
    # a length floor measured before it is served: the evaluation says which one it used
    too_long = api.post("/jobs/evaluate", json={"model_ids": ["tiny-grounded"], "dataset_id": memory_dataset,
                                                "length_floor": 3})
    assert too_long.status_code == 422 and "length_floor" in json.dumps(too_long.json()["detail"])
    negative = api.post("/jobs/evaluate", json={"model_ids": ["tiny-grounded"], "dataset_id": memory_dataset,
                                                "copy_bias": -1})
    assert negative.status_code == 422 and "copy_bias" in json.dumps(negative.json()["detail"])
    too_many = api.post("/jobs/evaluate", json={"model_ids": ["tiny-grounded"], "dataset_id": memory_dataset,
                                                 "copy_exemplars": 9})
    assert too_many.status_code == 422 and "copy_exemplars" in json.dumps(too_many.json()["detail"])
    ev = api.post("/jobs/evaluate", json={"model_ids": ["tiny-grounded"], "dataset_id": memory_dataset,
                                          "max_new_tokens": 4, "max_samples": 4, "length_floor": 1.0,
                                          "copy_bias": 2.0, "copy_exemplars": 2, "consensus_pool": 0,
                                          "no_repeat_ngram_size": 8})
    finished = wait_job(api, ev.json()["id"], timeout=300)
    assert finished["status"] == "succeeded", finished["error"]
    floored = api.get(f"/evaluations/{finished['result']['evaluation_id']}").json()["metrics"]["tiny-grounded"]
    assert floored["grounding"]["length_floor"] == 1.0 and floored["grounding"]["k"] == 2
    assert floored["grounding"]["copy_bias"] == 2.0 and floored["grounding"]["consensus_pool"] == 0
    assert floored["grounding"]["copy_exemplars"] == 2
    assert floored["grounding"]["no_repeat_ngram_size"] == floored["no_repeat_ngram_size"] == 8
    board = {r["model"]: r for r in api.get("/leaderboard", params={"dataset_id": memory_dataset}).json()["data"]}
    assert board["tiny-grounded"]["grounding"]["length_floor"] == 1.0  # the board says how it was measured
    assert board["tiny-grounded"]["grounding"]["copy_bias"] == 2.0
    board = api.get("/leaderboard", params={"dataset_id": memory_dataset}).json()["data"]
    assert "retrieval" in {row["model"] for row in board}


def csra_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csra.cli", *args], env={**stack.env, "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=240)


def test_reply_settings_set_after_training_are_what_it_replies_with(api, memory_dataset, stack):
    """The same request, no override in it: the model's reply settings decide whether its reply keeps to the
    approved answer, and the evaluation says which it measured."""
    if api.get("/models/tiny-grounded").status_code == 404:  # this test alone: train it as the one above does
        job = api.post("/jobs/train", json={"dataset_id": memory_dataset, "epochs": 1, "batch_size": 8,
                                            "max_input_length": 256, "output_name": "tiny-grounded",
                                            "grounding": {"k": 2, "max_exemplar_tokens": 24}}).json()
        assert wait_job(api, job["id"], timeout=300)["status"] == "succeeded"
    if api.get("/memory").json()["entries"] == 0:
        _rebuild(api, memory_dataset)
    message = "cancel order 3 please"
    nearest = {h["id"]: h["reply"] for h in api.get("/memory/search", params={"q": message, "k": 8}).json()["data"]}

    def reply() -> dict:
        job = api.post("/jobs/generate", json={"model_id": "tiny-grounded", "message": message, "max_new_tokens": 4})
        done = wait_job(api, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        return done["result"]

    try:
        held = api.put("/models/tiny-grounded/reply-settings", json={"copy_bias": 20})
        assert held.status_code == 200 and held.json()["grounding"]["copy_bias"] == 20, held.text
        copied = reply()  # the approved answer it follows, whole, past max_new_tokens 4
        assert copied["raw_text"] == nearest[copied["grounded_on"][0]].strip() and copied["completion_tokens"] > 4

        free = api.put("/models/tiny-grounded/reply-settings", json={"copy_bias": 0, "length_floor": 0})
        assert free.status_code == 200, free.text
        own = reply()  # nothing holds it to the answer: the random tiny model's own words, the caller's limit
        assert own["completion_tokens"] <= 4 and own["raw_text"] != copied["raw_text"]

        ev = api.post("/jobs/evaluate", json={"model_ids": ["tiny-grounded"], "dataset_id": memory_dataset,
                                              "max_new_tokens": 4, "max_samples": 2})
        finished = wait_job(api, ev.json()["id"], timeout=300)
        assert finished["status"] == "succeeded", finished["error"]
        measured = api.get(f"/evaluations/{finished['result']['evaluation_id']}").json()["metrics"]["tiny-grounded"]
        assert (measured["grounding"]["copy_bias"], measured["grounding"]["length_floor"]) == (0, 0)

        # the same from the terminal: a setting given joins those set before; a bad one is the API's one line
        changed = csra_cli(stack, "models", "reply-settings", "tiny-grounded", "--copy-bias", "2.5")
        assert changed.returncode == 0, changed.stderr
        rows = {line.split("│")[1].strip(): line for line in changed.stdout.splitlines() if line.startswith("│")}
        assert "2.5 (set)" in rows["copy_bias"] and "0.0 (set)" in rows["length_floor"]
        assert "(set)" not in rows["min_similarity"]
        assert api.get("/models/tiny-grounded").json()["reply_settings"] == {"copy_bias": 2.5, "length_floor": 0}
        bad = csra_cli(stack, "models", "reply-settings", "tiny-grounded", "--loop-guard", "1")
        assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "no_repeat_ngram_size" in bad.stderr
        assert csra_cli(stack, "models", "reply-settings", "tiny-grounded", "--reset").returncode == 0
        assert api.get("/models/tiny-grounded").json()["reply_settings"] is None
    finally:
        api.put("/models/tiny-grounded/reply-settings", json={})
    trained = api.get("/models/tiny-grounded").json()
    assert trained["reply_settings"] is None and trained["grounding"] == trained["training_config"]["grounding"]
