"""No database call runs on the API's event loop: one slow or locked query must not stall the others.

FastAPI runs plain ``def`` routes and dependencies in its thread pool and ``async def`` ones on the
event loop, so a route or dependency that touches the database must be a plain ``def`` (or hand its
work to ``run_in_threadpool``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.deps import get_db
from api.main import create_app


def _dependencies(dep: Dependant) -> Iterator[Dependant]:
    for sub in dep.dependencies:
        yield sub
        yield from _dependencies(sub)


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def test_the_session_dependency_runs_in_the_thread_pool() -> None:
    assert not _is_async(get_db)


def test_no_async_route_takes_a_database_session() -> None:
    offenders = []
    for route in create_app().routes:
        if not isinstance(route, APIRoute) or not _is_async(route.endpoint):
            continue
        if any(d.call is get_db for d in _dependencies(route.dependant)):
            offenders.append(f"{','.join(sorted(route.methods))} {route.path}")
    assert offenders == [], f"async routes that would query the database on the event loop: {offenders}"


def test_async_dependencies_do_no_database_work() -> None:
    for route in create_app().routes:
        if isinstance(route, APIRoute):
            for dep in _dependencies(route.dependant):
                if _is_async(dep.call):
                    source = inspect.getsource(dep.call)  # type: ignore[arg-type]
                    assert "session" not in source.lower() and "get_db" not in source, dep.call
