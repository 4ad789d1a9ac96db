"""A stack with ``CSRA_MODEL_STORE_URL`` (a file:// folder): training publishes, a worker that lacks a
model fetches it from the store, deleting it removes it everywhere. Real API, Redis and Celery workers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _start_stack
from tests.integration.helpers import train_scripted, wait_job
from tests.stack import Stack


@pytest.fixture(scope="module")
def store_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    root = tmp_path_factory.mktemp("storestack")
    shared = root / "shared-models"
    shared.mkdir()
    st = _start_stack(root, CSRA_MODEL_STORE_URL=f"file://{shared}")
    try:
        yield st, shared
    finally:
        st.stop()


def test_models_go_through_the_shared_store(store_stack: tuple[Stack, Path]) -> None:
    import httpx

    st, shared = store_stack
    assert (shared / "baseline" / "manifest.json").is_file()  # `csra models init` published it
    with httpx.Client(base_url=st.url, timeout=30) as api:
        name = train_scripted(api, "shared-scripted", "Your order is cancelled.")
        manifest = json.loads((shared / name / "manifest.json").read_text())
        row = api.get(f"/models/{name}").json()
        assert manifest["content_hash"] == row["content_hash"]

        # this host loses its copy, as a second host never had one: the generate worker fetches it
        local = Path(st.env["CSRA_DATA_DIR"]) / "models"
        shutil.rmtree(local / name)
        (local / ".cache" / f"{name}.json").unlink()
        job = api.post("/jobs/generate", json={"model_id": name, "message": "please cancel order 3",
                                               "max_new_tokens": 12})
        done = wait_job(api, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        assert "cancelled" in done["result"]["text"]
        assert json.loads((local / ".cache" / f"{name}.json").read_text())["source"] == "fetched"

        assert api.delete(f"/models/{name}").status_code == 204
        assert not (shared / name).exists() and not (local / name).exists()
