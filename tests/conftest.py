"""Shared fixtures. Integration fixtures start real services; nothing is mocked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import PostgresServer, RedisServer, Stack, free_port, stack_env

REPO = Path(__file__).resolve().parents[1]
BITEXT = REPO.parent / "shared" / "data" / "bitext" / "bitext_customer_support.csv"


@pytest.fixture(scope="session")
def bitext_path() -> Path:
    if not BITEXT.is_file():
        pytest.skip(f"the Bitext development copy is not at {BITEXT}")
    return BITEXT


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M baseline, converted once for the session (about 30 s on two cores) into an
    empty store by the code the product runs (``ensure_baseline``; ``tests/models_store/test_loading.py``
    checks what that conversion left)."""
    from models_store.loading import ensure_baseline

    return ensure_baseline(tmp_path_factory.mktemp("smollm2-store"))


DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL server for the session (tests make their own databases on it)."""
    server = PostgresServer()
    server.start()  # not installed: RuntimeError naming the package (make system installs it)
    try:
        yield server
    finally:
        server.stop()


def _start_stack(root: Path, **settings: str) -> Stack:
    """Redis + migrated database + workers (default with the sweep, train, generate) + API, all real processes."""
    (root / "imports").mkdir()
    server = RedisServer(root / "redis")
    server.start()
    port = free_port()
    st = Stack(root=root, redis=server, env=stack_env(root, server.url, port, **settings), api_port=port)
    try:
        st.boot((("default", "--beat"), ("train",), ("generate",)))
    except BaseException:
        st.stop()
        raise
    return st


@pytest.fixture(scope="session")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack over a SQLite file (the default database)."""
    st = _start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def postgresql_stack(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Stack]:
    """The whole stack over a PostgreSQL database (its own, on the session's server)."""
    st = _start_stack(tmp_path_factory.mktemp("pgstack"), CSRA_DATABASE_URL=postgres.create_database("stack"))
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Stack:
    """The stack a test runs against: SQLite, or each database in turn in a module marked
    ``pytest.mark.databases("sqlite", "postgresql")`` (its module-scoped fixtures are made per database)."""
    return request.getfixturevalue(f"{getattr(request, 'param', 'sqlite')}_stack")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None and "stack" in metafunc.fixturenames:
        unknown = set(marker.args) - set(DATABASES)
        assert not unknown, f"unknown database(s) {unknown}; choose from {DATABASES}"
        metafunc.parametrize("stack", marker.args, indirect=True, scope="module")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failing test (or fixture) that ran against a stack shows the tail of that stack's process logs: a
    worker that stopped taking jobs is otherwise only a timeout (the logs go when the stack does)."""
    report: pytest.TestReport = yield
    st = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(st, Stack):
        report.sections.append(("stack logs", st.logs()))
    return report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "databases(*names): run the module's stack tests on each database "
                            "(sqlite, postgresql)")


@pytest.fixture()
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def api_module(stack: Stack) -> Iterator[httpx.Client]:
    """A client for a test module's module-scoped fixtures (a dataset imported once per module)."""
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        yield client


@pytest.fixture()
def db_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point this test process's settings at the stack's database (for direct checks)."""
    from csra.settings import get_settings
    from db.session import get_engine, get_sessionmaker

    for k, v in stack.env.items():
        if k.startswith("CSRA_"):
            monkeypatch.setenv(k, v)
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()
    yield
    get_engine().dispose()
    for f in (get_settings, get_engine, get_sessionmaker):
        f.cache_clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
