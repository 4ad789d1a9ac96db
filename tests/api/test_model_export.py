"""GGUF export requests the API refuses before any job (the in-process app, a real migrated database)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def make_client_with_model(make_client):
    """The in-process API over its own database with one registered model of the given architecture."""
    from db.models import Model
    from db.session import get_sessionmaker

    def make(architecture: str):
        client = make_client()
        with get_sessionmaker()() as db:
            db.add(Model(name="t5", kind="base", architecture=architecture, path=str(Path("/nonexistent"))))
            db.commit()
        return client

    return make


def test_an_unsupported_architecture_is_a_422_naming_it(make_client_with_model):
    r = make_client_with_model("T5ForConditionalGeneration").post("/models/t5/export", json={})
    assert r.status_code == 422 and "T5ForConditionalGeneration" in r.json()["detail"]
    assert "LlamaForCausalLM" in r.json()["detail"]
