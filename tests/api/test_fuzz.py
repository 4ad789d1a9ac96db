"""schemathesis over the whole OpenAPI schema, against the in-process app (a migrated SQLite database
with a few rows, Redis on a closed port: every submission answers 503 and stores nothing).

Every operation gets a fixed number of derandomized examples (the same requests on every run); any
5xx but the documented 503 of a submission, any undocumented status and any response that does not
match its schema fails. The model-work routes need no exclusion: with the queue down they answer 503
before any model is touched.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    unsupported_method,
)

MAX_EXAMPLES = 25
LOCAL = "http://127.0.0.1:8000"
QUEUE_DOWN = "redis"  # in /health's body and in every submission's 503 detail (CSRA_REDIS_URL)


_current: dict[str, Any] = {}


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app of the running test, as seen from this machine: schemathesis' ASGI client calls itself
    ``testclient``, which the guards (rightly) treat as a remote caller while no API key is set."""
    if "app" not in _current:  # loading the schema at collection: any app serves the same /openapi.json
        from api.main import create_app

        _current["app"] = create_app()
    if scope["type"] == "http":  # and it names itself ``testserver`` in Host, which the guards refuse too
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"host"]
        scope = {**scope, "client": ("127.0.0.1", 50000), "headers": [(b"host", b"127.0.0.1:8000"), *headers]}
    await _current["app"](scope, receive, send)


def _seed() -> None:
    """One row of each kind, so generated small ids find something besides 404s."""
    from db.models import Dataset, DatasetExample, Job, Model
    from db.session import session_scope

    with session_scope() as s:
        s.add(Model(name="baseline", kind="base", path="/nowhere/baseline"))
        ds = Dataset(name="d", source="file:/nowhere/d.csv", status="ready", options={}, row_count=1)
        s.add(ds)
        s.flush()
        s.add(DatasetExample(dataset_id=ds.id, split="train", instruction="i", input="where is my order",
                             output="It is on its way.", intent="track_order", category="ORDER", flags=""))
        s.add(Job(kind="train", queue="train", status="succeeded", params={"dataset_id": ds.id}, stage="done"))


@pytest.fixture(autouse=True)
def _fresh_app(make_client):  # type: ignore[no-untyped-def]
    """A migrated database with a few rows for each operation, and Redis down."""
    _current["app"] = make_client().app
    _seed()
    yield
    _current.clear()


schema = schemathesis.openapi.from_asgi("/openapi.json", _app)
schema.config.update(base_url=LOCAL)


# Left out: ``not_a_server_error`` (replaced below: the queue is down on purpose here);
# ``positive_data_acceptance`` (it wants a 2xx for any schema-valid body, but a dataset id that does not
# exist or a blank chat message is schema-valid and rightly a 422/404); ``unsupported_method`` (an
# undeclared method on a path must be a 405) and ``allow_header_conformance`` (whose Allow lists every
# method of the path): Starlette's 405 lists only the first matching route's methods, and the guards
# answer 403/415 before routing; ``negative_data_rejection`` (pydantic's lax mode accepts ``false`` for an
# integer seed and the like: coercions, not crashes).
NOT_CHECKED = [not_a_server_error, positive_data_acceptance, negative_data_rejection, unsupported_method,
               allow_header_conformance]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_every_answer_documented(case: Any) -> None:
    case.call_and_validate(base_url=LOCAL, excluded_checks=NOT_CHECKED,
                           additional_checks=[no_server_error_but_queue_down])


def no_server_error_but_queue_down(ctx: Any, response: Any, case: Any) -> None:
    """schemathesis' ``not_a_server_error``, except the 503 that says Redis (down here) is unreachable."""
    if response.status_code >= 500 and not (response.status_code == 503 and QUEUE_DOWN in response.text):
        raise AssertionError(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
