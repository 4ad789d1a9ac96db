"""Chats served through llama.cpp from a model's GGUF export, against the real stack: the same reply,
stream, placeholders and chat turn as the torch backend; clear failures; torch keeps serving."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import train_scripted, wait_job
from tests.integration.test_chat import _stream

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup builds it)")
REPLY = "Your order {{Order Number}} is on its way."


@pytest.fixture(scope="module")
def exported(stack) -> str:
    """A scripted tiny model with an f16 GGUF export."""
    with httpx.Client(base_url=stack.url, timeout=30) as api:
        name = train_scripted(api, "tiny-llama-served", REPLY)
        job = api.post(f"/models/{name}/export", json={"quantization": "f16"}).json()
        assert wait_job(api, job["id"], timeout=180)["status"] == "succeeded"
    return name


def _generate(api, **body) -> dict:
    r = api.post("/jobs/generate", json={"message": "please cancel order 7", "max_new_tokens": 24, **body})
    assert r.status_code == 202, r.text
    return r.json()


def test_llama_cpp_streams_the_same_reply_as_torch(api, stack, exported):
    torch_done = wait_job(api, _generate(api, model_id=exported, backend="torch")["id"])
    job = _generate(api, model_id=exported)  # auto: the export exists, so llama.cpp serves it
    tokens, done = _stream(stack.url, job["id"])
    assert done is not None and done["status"] == "succeeded", done
    result = done["result"]
    assert result["backend"] == "llamacpp:f16" and torch_done["result"]["backend"] == "torch"
    assert len(tokens) > 3 and "".join(tokens).strip() == result["raw_text"]
    assert result["raw_text"] == torch_done["result"]["raw_text"]
    assert result["raw_text"].startswith("Your order {{Order Number}}")
    assert result["text"] == torch_done["result"]["text"]  # placeholders filled the same way
    assert result["slot_warnings"] == torch_done["result"]["slot_warnings"]


def test_concurrent_chats_share_the_llama_cpp_model(api, exported):
    chat = api.post("/chats", json={"settings": {"model_id": exported, "max_new_tokens": 16,
                                                 "backend": "llamacpp"}}).json()
    first = api.post(f"/chats/{chat['id']}/messages", json={"content": "please cancel order 9"}).json()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(lambda _: _generate(api, model_id=exported, backend="llamacpp")["id"], range(6)))
    done = [wait_job(api, j) for j in jobs]
    assert all(d["status"] == "succeeded" for d in done)
    assert len({d["result"]["raw_text"] for d in done}) == 1  # greedy: the same reply whatever the batch
    reply = api.get(f"/chats/{chat['id']}").json()["messages"][1]
    assert wait_job(api, first["job"]["id"])["result"]["backend"] == "llamacpp:f16"
    assert reply["status"] == "done" and reply["content"]


def test_no_export_or_a_broken_one_fails_readably_and_torch_still_serves(api, stack, exported):
    missing = wait_job(api, _generate(api, model_id="baseline", backend="llamacpp:q4_k_m")["id"])
    assert missing["status"] == "failed" and "no GGUF export at q4_k_m" in missing["error"]
    broken = Path(stack.root) / "data" / "models" / exported / "exports" / f"{exported}-q8_0.gguf"
    assert broken.parent.is_dir()
    broken.write_bytes(b"GGUF this is not a model")
    try:
        failed = wait_job(api, _generate(api, model_id=exported, backend="llamacpp:q8_0")["id"])
        assert failed["status"] == "failed" and "llama.cpp could not load" in failed["error"], failed["error"]
        served = wait_job(api, _generate(api, model_id=exported, backend="torch")["id"])
        assert served["status"] == "succeeded" and served["result"]["raw_text"].startswith("Your order")
    finally:
        broken.unlink()


def test_an_evaluation_through_llama_cpp_matches_torch(api, exported):
    dataset_id = api.get(f"/models/{exported}").json()["dataset_id"]
    base = {"model_ids": [exported], "dataset_id": dataset_id, "max_samples": 4, "max_new_tokens": 16}
    missing = api.post("/jobs/evaluate", json={**base, "backend": "llamacpp:q4_k_m"})
    assert missing.status_code == 422 and "export" in missing.json()["detail"]
    runs = {}
    for backend in ("torch", "llamacpp:f16"):
        job = api.post("/jobs/evaluate", json={**base, "backend": backend}).json()
        done = wait_job(api, job["id"], timeout=300)
        assert done["status"] == "succeeded", done["error"]
        ev = done["result"]["evaluation_id"]
        runs[backend] = api.get(f"/evaluations/{ev}/examples", params={"sort": "id"}).json()["data"]
        assert api.get(f"/evaluations/{ev}").json()["metrics"][exported]["backend"] == backend
    assert [r["prediction"] for r in runs["torch"]] == [r["prediction"] for r in runs["llamacpp:f16"]]
