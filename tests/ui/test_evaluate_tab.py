"""The Evaluate tab without a browser: the body "Run evaluation" posts is the API's own (validated by the
real ``EvaluateSpec``), with the split, the backend and the copy bias the form chose; and the examples'
filters and table. HTTP is stubbed with an ``httpx.MockTransport`` that answers as the API does."""

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


EXAMPLES = [
    {"id": 1, "model": "ft-3", "example_id": 11, "intent": "cancel_order", "category": "ORDER",
     "prompt": "cancel order 5", "reference": "I can help you cancel order {{Order Number}}.",
     "prediction": "Sure, sure, sure, sure.", "scores": {"rouge_l": 0.0812, "repetitive": True, "too_verbose": False},
     "latency_ms": 10.0},
    {"id": 2, "model": "ft-3", "example_id": 12, "intent": "track_refund", "category": "REFUND",
     "prompt": "where is my refund", "reference": "Refunds reach you within 5 days.",
     "prediction": "Refunds reach you within 5 days.", "scores": {"rouge_l": 1.0}, "latency_ms": 9.0},
]


@pytest.fixture()
def examples_api(monkeypatch: pytest.MonkeyPatch) -> list[httpx.URL]:
    asked: list[httpx.URL] = []

    def api(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        if request.url.path == "/evaluations/4":
            return httpx.Response(200, json={"id": 4, "metrics": {
                "ft-3": {"overall": {}, "per_intent": {"track_refund": {}, "cancel_order": {}}},
                "retrieval": {"overall": {}, "per_intent": {"cancel_order": {}}}}})
        if request.url.path == "/evaluations/4/examples":
            if request.url.params.get("pattern") == "bogus":
                return httpx.Response(422, json={"detail": "unknown pattern 'bogus'; choose from too_verbose, ..."})
            return httpx.Response(200, json={"count": 120, "data": EXAMPLES})
        return httpx.Response(404, json={"detail": "Not Found"})

    c = Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(api))
    monkeypatch.setattr(evaluate, "client", lambda: c)
    return asked


def test_an_evaluation_s_models_and_intents_fill_the_filters(examples_api: list[httpx.URL]) -> None:
    models, intents = evaluate.example_filters(4)
    assert models.choices == [("ft-3", "ft-3"), ("retrieval", "retrieval")] and models.value == "ft-3"
    assert intents.choices == [("any", ""), ("cancel_order", "cancel_order"), ("track_refund", "track_refund")]


def test_examples_are_asked_with_their_filters_and_shown_with_their_flags(examples_api: list[httpx.URL]) -> None:
    table, line = evaluate.show_examples(4, "ft-3", "repetitive", "cancel_order", "worst", 2)
    params = examples_api[-1].params
    assert (params["model"], params["pattern"], params["intent"], params["sort"], params["offset"]) == (
        "ft-3", "repetitive", "cancel_order", "worst", "50")
    assert line == "ft-3: 120 example(s) (repetitive · cancel_order); 51-52 shown, page 2 of 3"
    assert list(table["flags"]) == ["repetitive", ""] and list(table["ROUGE-L"]) == [0.081, 1.0]
    assert table.iloc[0]["customer message"] == "cancel order 5"
    evaluate.show_examples(4, "ft-3", "", "", "worst")
    assert "pattern" not in examples_api[-1].params and "intent" not in examples_api[-1].params  # "any"


def test_examples_need_an_evaluation_and_a_model_and_a_bad_filter_is_the_api_s_detail(
        examples_api: list[httpx.URL]) -> None:
    with pytest.raises(gr.Error, match="Pick an evaluation"):
        evaluate.show_examples(None, None, "", "", "worst")
    with pytest.raises(gr.Error, match="unknown pattern 'bogus'"):
        evaluate.show_examples(4, "ft-3", "bogus", "", "worst")


def test_every_pattern_offered_is_one_the_api_lists() -> None:
    from api.services.evaluations import ERROR_PATTERNS  # what GET /evaluations/{id}/examples accepts

    assert [v for _, v in evaluate.PATTERN_CHOICES if v] == list(ERROR_PATTERNS)
