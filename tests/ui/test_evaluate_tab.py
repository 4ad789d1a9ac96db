"""The Evaluate tab's "Run evaluation" without a browser: the body it posts is the API's own
(validated by the real ``EvaluateSpec``), with the split, the backend and the copy bias the form chose.
HTTP is stubbed with an ``httpx.MockTransport`` that answers ``POST /jobs/evaluate`` as the API does."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import httpx
import pytest

from csra.client import Client
from csra.specs import EvaluateSpec
from ui.tabs import evaluate


@pytest.fixture()
def posted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []

    def api(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/jobs/evaluate")
        bodies.append(json.loads(request.content))
        return httpx.Response(202, json={"id": 12, "kind": "evaluate", "status": "queued", "progress": 0.0,
                                         "stage": "", "eta_seconds": None, "error": None, "finished": False})

    c = Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(api))
    monkeypatch.setattr(evaluate, "client", lambda: c)
    return bodies


def test_the_form_s_split_backend_and_copy_bias_reach_the_api(posted: list[dict[str, Any]]) -> None:
    job_id, *_ = evaluate.eval_start(["retrieval", "ft-3"], 2, 300, 256, 1, 42, "validation", "llamacpp:bf16", "2.5")
    assert job_id == 12
    spec = EvaluateSpec.model_validate(posted[-1])
    assert (spec.split, spec.backend, spec.copy_bias, spec.max_samples) == ("validation", "llamacpp:bf16", 2.5, 300)


def test_left_alone_it_is_the_test_split_on_torch_with_each_model_s_own_copy_bias(posted: list[dict[str, Any]]) -> None:
    evaluate.eval_start(["ft-3"], 2, 0, 256, 1, 42, "test", "torch", "model")
    assert "copy_bias" not in posted[-1] and posted[-1]["max_samples"] is None  # 0: the whole split
    spec = EvaluateSpec.model_validate(posted[-1])
    assert (spec.split, spec.backend, spec.copy_bias) == ("test", "torch", None)


def test_every_backend_offered_is_one_the_api_takes(posted: list[dict[str, Any]]) -> None:
    for backend in evaluate.EVAL_BACKENDS:
        evaluate.eval_start(["ft-3"], 2, 10, 64, 1, 0, "test", backend, None)
        assert EvaluateSpec.model_validate(posted[-1]).backend == backend
    with pytest.raises(gr.Error, match="Pick at least one model"):
        evaluate.eval_start([], 2, 10, 64, 1, 0, "test", "torch", None)
