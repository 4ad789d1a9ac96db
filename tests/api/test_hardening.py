"""The API refuses hostile input cleanly (a 4xx with a ``detail``) and stores nothing when it does:
cross-site and non-loopback changes without a key, other content types, oversized and chunked bodies,
huge sweeps, paths outside the import folders, out-of-range numbers and bad OpenAI content parts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.fixture()
def client(make_client) -> TestClient:  # type: ignore[no-untyped-def]
    return make_client()


def _refused(r: Any, status: int, *needles: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = str(r.json()["detail"])
    assert all(n in detail for n in needles), detail


def _count(path: str, client: TestClient) -> int:
    return int(client.get(path).json()["count"])


# ------------------------------------------------------------------ cross-site / loopback (no key set)

@pytest.mark.parametrize("headers", [
    {"host": "evil.example"},                            # DNS rebinding: a foreign name pointing at 127.0.0.1
    {"origin": "http://evil.example"},                   # a web page of another site
    {"origin": "null"},
    {"sec-fetch-site": "cross-site"},
])
def test_changes_without_a_key_need_a_local_caller(client: TestClient, headers: dict[str, str]) -> None:
    _refused(client.post("/jobs/1/cancel", headers=headers), 403, "CSRA_API_KEY")
    if "host" in headers:  # a rebound name may not read either (the browser would hand the page the answer)
        _refused(client.get("/chats/export", headers=headers), 403, "CSRA_API_KEY", "Host")
    else:
        assert client.get("/jobs", headers=headers).status_code == 200  # reads are not changes


def test_changes_from_another_machine_are_refused(make_client) -> None:  # type: ignore[no-untyped-def]
    make_client()
    from api.main import create_app

    remote = TestClient(create_app(), base_url="http://127.0.0.1:8000", client=("192.0.2.7", 4000))
    _refused(remote.post("/chats", json={}), 403, "CSRA_API_KEY", "loopback")
    _refused(remote.delete("/models/1"), 403, "CSRA_API_KEY")


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1", "[::1]:8000"])
def test_local_callers_may_change_things(client: TestClient, host: str) -> None:
    r = client.post("/chats", json={}, headers={"host": host, "origin": f"http://{host}"})
    assert r.status_code == 422 and "unknown model" in r.json()["detail"], r.text  # past the guard


def test_with_a_key_the_loopback_rule_gives_way_to_the_key(make_client) -> None:  # type: ignore[no-untyped-def]
    make_client(CSRA_API_KEY="k")
    from api.main import create_app

    remote = TestClient(create_app(), base_url="http://api.example", client=("192.0.2.7", 4000))
    r = remote.post("/chats", json={}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 422 and "unknown model" in r.json()["detail"], r.text  # past the guard
    non_ascii = {"Authorization": "Bearer kéy".encode("latin-1")}  # type: ignore[dict-item]
    _refused(remote.post("/chats", json={}, headers=non_ascii), 401, "API key")


# ------------------------------------------------------------------ content types (415)

@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_routes_refuse_other_content_types(client: TestClient, ctype: str | None) -> None:
    body = b'{"name": "x", "source": "x.csv"}'
    headers = {"content-type": ctype} if ctype else {}
    if ctype is None:  # httpx always names a type for content=...; a browser's fetch may send none
        headers = {"content-type": ""}
    _refused(client.post("/datasets", content=body, headers=headers), 415, "application/json")
    _refused(client.post("/chats", content=b"{}", headers=headers), 415, "application/json")
    assert _count("/datasets", client) == 0 and _count("/chats", client) == 0


def test_a_body_without_content_type_is_refused(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"{}"

    r = client.post("/chats", content=chunks())  # chunked, no Content-Type at all
    _refused(r, 415, "Content-Type")
    assert client.post("/jobs/999/cancel").status_code == 404  # no body at all: fine


# ------------------------------------------------------------------ body limits (413)

def test_json_bodies_are_capped(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(CSRA_MAX_REQUEST_KB="4")
    _refused(client.post("/chats", json={"title": "x" * 8000}), 413, "CSRA_MAX_REQUEST_KB")

    def chunks() -> Iterator[bytes]:
        yield b'{"title": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/chats", content=chunks(), headers={"content-type": "application/json"})
    _refused(r, 413, "CSRA_MAX_REQUEST_KB")
    assert _count("/chats", client) == 0


def test_chunked_uploads_are_capped_before_they_are_stored(make_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = make_client(CSRA_MAX_UPLOAD_MB="1")
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
            b"Content-Type: text/csv\r\n\r\nflags,instruction,category,intent,response\n")

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(3):
            yield b"B,x,ORDER,i,y\n" * 75_000  # ~1 MB a chunk
        yield b"\r\n--b--\r\n"

    r = client.post("/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    _refused(r, 413, "CSRA_MAX_UPLOAD_MB")
    uploads = tmp_path / "data" / "uploads"
    assert not uploads.exists() or not any(p.is_file() for p in uploads.rglob("*"))
    assert _count("/datasets", client) == 0


def test_json_nested_too_deep_is_a_4xx(client: TestClient) -> None:
    deep = b'{"name": "x", "source": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/datasets", "/chats"):
        r = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["detail"], (path, r.text)


# ------------------------------------------------------------------ sweeps

def test_a_huge_sweep_grid_is_refused_from_its_list_lengths(client: TestClient) -> None:
    grid = {"learning_rate": [1e-4] * 1000, "batch_size": [8] * 1000, "epochs": [1] * 1000}
    _refused(client.post("/jobs/sweep", json={"dataset_id": 1, "grid": grid}), 422, "at most 32")
    grid = {"learning_rate": [1e-4] * 8, "batch_size": [8] * 8}  # each list short, the product too big
    _refused(client.post("/jobs/sweep", json={"dataset_id": 1, "grid": grid}), 422, "at most 32", "8 x 8")
    _refused(client.post("/jobs/sweep", json={"dataset_id": 1, "grid": {"epochs": []}}), 422, "at least 1")
    for tokens in (0, 5000):  # the evaluation's own bounds (csra.specs.MaxNewTokens)
        _refused(client.post("/jobs/sweep", json={"dataset_id": 1, "configs": [{}], "eval_max_new_tokens": tokens}),
                 422, "eval_max_new_tokens")
    assert _count("/jobs", client) == 0


def test_sweep_size_is_computed_without_expanding() -> None:
    from api.schemas.training import SweepCreate

    sweep = SweepCreate(dataset_id=1, configs=[{}, {"epochs": 2}], grid={"learning_rate": [1e-4, 5e-5, 1e-5]})
    assert sweep.size() == 6 == len(sweep.expand())


# ------------------------------------------------------------------ import sources and uploads

def test_the_data_dir_is_not_an_import_root(client: TestClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    data = tmp_path / "data"
    for source in (data / "csra.db", data / "uploads" / "x" / "rows.csv", data / "x.csv"):
        _refused(client.post("/datasets", json={"name": "x", "source": str(source)}), 403, "CSRA_IMPORT_ROOTS")
    r = client.post("/datasets", json={"name": "x", "source": "../../etc/passwd"})
    _refused(r, 403, "'../../etc/passwd'")
    assert os.getcwd() not in r.json()["detail"]  # the source as typed, not the server's resolved path
    (data / "imports").mkdir()
    r = client.post("/datasets", json={"name": "x", "source": "./missing.csv"})
    _refused(r, 403)
    assert os.getcwd() not in r.json()["detail"]
    r = client.post("/datasets", json={"name": "x", "source": str(data / "imports" / "missing.csv")})
    _refused(r, 422, "no file")


def test_a_root_that_contains_the_data_dir_still_hides_it(make_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = make_client(CSRA_IMPORT_ROOTS=f'["{tmp_path}"]')
    (tmp_path / "mine.csv").write_text("a,b\n")
    _refused(client.post("/datasets", json={"name": "x", "source": str(tmp_path / "data" / "csra.db")}), 403)
    r = client.post("/datasets", json={"name": "x", "source": str(tmp_path / "mine.csv")})
    assert r.status_code == 503  # allowed; the queue is down here


@pytest.mark.parametrize("source", ["./a\x00b.csv", "./" + "a" * 300 + ".csv", "~nobody_such_user/x.csv",
                                    "/imports/" + "b" * 300 + "/c.csv"])
def test_unusable_paths_are_4xx(client: TestClient, source: str) -> None:
    r = client.post("/datasets", json={"name": "x", "source": source})
    assert r.status_code in (403, 422) and r.json()["detail"], r.text


def test_upload_names_are_made_safe(client: TestClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/datasets", files={"file": ("a" * 300 + ".csv", b"a,b\n1,2\n")})
    assert r.status_code == 503, r.text  # stored fine; only the queue is down
    _refused(client.post("/datasets", files={"file": ("x.csv", b"a,b\n")}, data={"name": "n" * 300}), 422, "name")
    from api.schemas.datasets import DatasetPublic

    shown = DatasetPublic.model_construct(source=f"upload:{tmp_path}/data/uploads/abc/rows.csv")
    assert shown.model_dump()["source"] == "upload:rows.csv"


def test_import_permissions_of_the_worker() -> None:
    from csra.settings import get_settings

    s = get_settings()
    assert s.data_dir not in s.allowed_import_roots and s.imports_dir in s.allowed_import_roots
    assert not s.importable(s.data_dir / "csra.db") and not s.importable(s.uploads_dir / "a" / "x.csv")
    assert s.importable(s.imports_dir / "x.csv") and s.importable(s.bitext_path)


# ------------------------------------------------------------------ numbers and ids

@pytest.mark.parametrize("path", [
    "/jobs/99999999999999999999999", "/jobs?offset=1.4e31", "/jobs?offset=99999999999999999999",
    "/datasets/9223372036854775808", "/jobs/1/events?after=99999999999999999999", "/models/²",
    "/models/99999999999999999999999", "/v1/fine_tuning/jobs/ftjob-²", "/v1/fine_tuning/jobs?after=abc",
    "/v1/fine_tuning/jobs/ftjob-1/events?after=abc", "/v1/fine_tuning/jobs?limit=-1", "/jobs?limit=501",
    "/chats?limit=0", "/chats/export?since=0.5",
])
def test_out_of_range_numbers_are_4xx(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert 400 <= r.status_code < 500 and r.json()["detail"], (path, r.text)


def test_huge_ids_in_bodies_are_422(client: TestClient) -> None:
    r = client.post("/jobs/train", json={"dataset_id": 2**64})
    assert r.status_code == 422 and r.json()["detail"], r.text


# ------------------------------------------------------------------ OpenAI content parts

@pytest.mark.parametrize(("content", "needle"), [
    ("   ", "non-empty"),
    ([{"type": "text", "text": 5}], "must be a string"),
    ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "image_url"),
    ([{"text": "no type"}], "not supported"),
])
def test_bad_openai_content_is_422(client: TestClient, content: Any, needle: str) -> None:
    r = client.post("/v1/chat/completions", json={"model": "baseline", "messages": [{"role": "user",
                                                                                      "content": content}]})
    _refused(r, 422, needle)


def test_refusing_to_serve_openly_without_a_key(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from csra.settings import Settings

    monkeypatch.delenv("CSRA_API_KEY", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        assert Settings(api_host=host).open_bind_problem() is None
    problem = Settings(api_host="0.0.0.0").open_bind_problem()
    assert problem and "CSRA_API_KEY" in problem and "secrets" in problem
    assert Settings(api_host="0.0.0.0", api_key="k").open_bind_problem() is None


def test_the_app_does_not_start_on_an_open_address_without_a_key(make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(CSRA_API_HOST="0.0.0.0")
    with pytest.raises(RuntimeError, match="CSRA_API_KEY"), client:
        pass
