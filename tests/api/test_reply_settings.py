"""A grounded model's reply settings set after training (the in-process app, a real migrated database):
what it replies with changes, what it was trained with stays, and bad input is a 422 naming the field."""

from __future__ import annotations

import json

import pytest

from csra.specs import Grounding, TrainSpec


@pytest.fixture()
def api(make_client):
    """The in-process API with a grounded fine-tune, an ungrounded one and the retrieval responder."""
    from db.models import Model
    from db.session import get_sessionmaker

    client = make_client()
    grounded = TrainSpec(dataset_id=1, grounding=Grounding(k=2)).model_dump(mode="json")
    with get_sessionmaker()() as db:
        db.add(Model(name="grounded", kind="fine-tuned", path="/nonexistent/g", training_config=grounded))
        db.add(Model(name="plain", kind="fine-tuned", path="/nonexistent/p",
                     training_config=TrainSpec(dataset_id=1).model_dump(mode="json")))
        db.commit()
    return client


def test_settings_replace_the_trained_values_until_taken_back(api):
    trained = api.get("/models/grounded").json()
    assert trained["reply_settings"] is None and trained["grounding"] == trained["training_config"]["grounding"]

    r = api.put("/models/grounded/reply-settings", json={"copy_bias": 2.5, "no_repeat_ngram_size": 6})
    assert r.status_code == 200, r.text
    assert r.json()["reply_settings"] == {"copy_bias": 2.5, "no_repeat_ngram_size": 6}
    served = api.get("/models/grounded").json()
    assert served["grounding"] == {**trained["grounding"], "copy_bias": 2.5, "no_repeat_ngram_size": 6}
    assert served["training_config"] == trained["training_config"]  # what it was trained with stays
    listed = {m["name"]: m for m in api.get("/models").json()["data"]}
    assert listed["grounded"]["grounding"]["copy_bias"] == 2.5 and listed["plain"]["grounding"] is None

    # a worker reads the served grounding from the registry for every job
    from models_store.registry import find_model_row

    assert find_model_row("grounded", local=False)["grounding"]["copy_bias"] == 2.5

    # a PUT replaces them all: what it leaves out goes back to the trained value
    api.put("/models/grounded/reply-settings", json={"min_similarity": 0})
    assert api.get("/models/grounded").json()["grounding"] == {**trained["grounding"], "min_similarity": 0}
    cleared = api.put("/models/grounded/reply-settings", json={}).json()
    assert cleared["reply_settings"] is None and cleared["grounding"] == trained["grounding"]


@pytest.mark.parametrize(("body", "named"), [
    ({"copy_bias": 21}, "copy_bias"),
    ({"no_repeat_ngram_size": 1}, "no_repeat_ngram_size"),
    ({"length_floor": -0.1}, "length_floor"),
    ({"k": 5}, "what the model was trained with"),
    ({"temperature": 0.7}, "temperature"),
])
def test_a_bad_setting_is_a_422_naming_it_and_nothing_changes(api, body, named):
    api.put("/models/grounded/reply-settings", json={"copy_bias": 2.5})
    r = api.put("/models/grounded/reply-settings", json=body)
    assert r.status_code == 422 and named in json.dumps(r.json()["detail"]), r.text
    assert api.get("/models/grounded").json()["reply_settings"] == {"copy_bias": 2.5}


def test_only_a_grounded_model_has_reply_settings(api):
    for name in ("plain", "retrieval"):
        r = api.put(f"/models/{name}/reply-settings", json={"copy_bias": 2.5})
        assert r.status_code == 422 and "not trained grounded" in r.json()["detail"], r.text
        assert api.get(f"/models/{name}").json()["reply_settings"] is None
    missing = api.put("/models/nope/reply-settings", json={"copy_bias": 2.5})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
