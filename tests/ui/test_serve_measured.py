"""The Evaluate tab's "Serve the reply settings this evaluation measured": the tab's handler against the
real API in process (a migrated SQLite database, no HTTP stub), so the evaluation it reads and the model
it changes are the API's own."""

from __future__ import annotations

import gradio as gr
import httpx
import pytest

from csra.client import Client
from csra.specs import Grounding, TrainSpec
from tests.api.conftest import make_client  # noqa: F401  (the in-process API fixture)
from ui.tabs import evaluate

TRAINED = Grounding(k=2).model_dump(mode="json")


@pytest.fixture()
def api(make_client, monkeypatch):  # noqa: F811
    """A grounded model, and an evaluation that measured it with a copy bias of 2.5 and a loop guard of 6
    (its other settings as trained) beside the retrieval responder."""
    from db.models import Evaluation, Model
    from db.session import get_sessionmaker

    test_client = make_client()
    with get_sessionmaker()() as db:
        db.add(Model(name="grounded", kind="fine-tuned", path="/nonexistent/g",
                     training_config=TrainSpec(dataset_id=1, grounding=Grounding(k=2)).model_dump(mode="json")))
        measured = {**TRAINED, "copy_bias": 2.5, "no_repeat_ngram_size": 6}
        db.add(Evaluation(id=7, split="validation", status="succeeded", metrics={
            "grounded": {"overall": {"rouge_l": 0.5}, "grounding": measured},
            "retrieval": {"overall": {"rouge_l": 0.4}, "grounding": None}}))
        db.add(Evaluation(id=8, split="validation", status="succeeded", metrics={
            "grounded": {"overall": {"rouge_l": 0.45}, "grounding": TRAINED}}))
        db.commit()
    def to_the_app(request: httpx.Request) -> httpx.Response:  # the client's request, answered by the real app
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        r = test_client.request(request.method, request.url.path, params=request.url.params,
                                content=request.content, headers=headers)
        return httpx.Response(r.status_code, content=r.content, headers=r.headers)

    c = Client(base_url="http://127.0.0.1:8000", api_key="", transport=httpx.MockTransport(to_the_app))
    monkeypatch.setattr(evaluate, "client", lambda: c)
    return test_client


def test_the_settings_measured_are_served_and_only_those_that_differ_are_set(api) -> None:
    line = evaluate.serve_measured(7, "grounded")
    model = api.get("/models/grounded").json()
    assert model["reply_settings"] == {"copy_bias": 2.5, "no_repeat_ngram_size": 6}
    assert model["grounding"]["copy_bias"] == 2.5 and model["grounding"]["k"] == 2
    assert "copy bias 2.5" in line and "set after training: copy_bias, no_repeat_ngram_size" in line

    # an evaluation of the trained settings serves those again
    assert "(as trained)" in evaluate.serve_measured(8, "grounded")
    assert api.get("/models/grounded").json()["reply_settings"] is None


def test_a_model_not_evaluated_grounded_or_nothing_picked_is_said_and_changes_nothing(api) -> None:
    with pytest.raises(gr.Error, match="retrieval was not evaluated grounded"):
        evaluate.serve_measured(7, "retrieval")
    with pytest.raises(gr.Error, match="Pick an evaluation"):
        evaluate.serve_measured(None, "grounded")
    assert api.get("/models/grounded").json()["reply_settings"] is None
