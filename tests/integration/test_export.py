"""GGUF export through the API against the real stack: a job on ``default``, the file kept beside the
model and downloadable, llama.cpp loads it; bad requests are 4xx and leave nothing behind."""

from __future__ import annotations

import hashlib

import pytest

from tests.integration.helpers import wait_job


@pytest.fixture()
def baseline_export_removed(stack):
    """The export this test makes is removed after it: with an export, backend auto would serve the shared
    `baseline` through llama.cpp in every later test."""
    yield
    for f in (stack.root / "data" / "models" / "baseline" / "exports").glob("*.gguf"):
        f.unlink()


def test_a_model_exports_to_gguf_that_llama_cpp_runs(api, tmp_path, baseline_export_removed):
    r = api.post("/models/baseline/export", json={"format": "gguf", "quantization": "q8_0"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "export" and job["queue"] == "default"
    done = wait_job(api, job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["file"] == "baseline-q8_0.gguf" and result["architecture"] == "LlamaForCausalLM"

    files = api.get("/models/baseline/files").json()
    assert [f["name"] for f in files["data"]] == ["baseline-q8_0.gguf"]
    download = api.get(result["url"])
    assert download.status_code == 200 and len(download.content) == result["size_bytes"]
    assert hashlib.sha256(download.content).hexdigest() == result["sha256"]

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup builds it)")
    path = tmp_path / result["file"]
    path.write_bytes(download.content)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    assert "{%" in llm.metadata["tokenizer.chat_template"]  # the template csra renders prompts with
    out = llm.create_completion("Where is my order?", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("ref", "body", "status", "needle"), [
    ("baseline", {"quantization": "q3"}, 422, "quantization"),
    ("baseline", {"format": "onnx"}, 422, "format"),
    ("no-such-model", {}, 404, "not found"),
    ("retrieval", {}, 422, "no weights"),
])
def test_bad_exports_are_refused_before_any_job(api, ref, body, status, needle):
    before = api.get("/jobs", params={"kind": "export"}).json()["count"]
    r = api.post(f"/models/{ref}/export", json=body)
    assert r.status_code == status and needle in str(r.json()["detail"]), r.text
    assert api.get("/jobs", params={"kind": "export"}).json()["count"] == before


def test_unknown_files_are_404_and_names_are_never_paths(api):
    for name in ("nope.gguf", "..%2Fconfig.json", "model.safetensors"):
        r = api.get(f"/models/baseline/files/{name}")
        assert r.status_code == 404 and r.json()["detail"], name
