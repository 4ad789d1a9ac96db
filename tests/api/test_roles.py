"""Every route states its role, and answers each kind of caller accordingly (401 / 403 / allowed).

Walks every operation of the OpenAPI document against the in-process app over a real, migrated SQLite
database with keys on: no key, an agent key, a revoked key, the bootstrap admin key and a named admin key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db.keys import Role, create_key, revoke_key

README = Path(__file__).resolve().parents[2] / "README.md"
BOOTSTRAP = "bootstrap-secret"


@pytest.fixture()
def keyed(make_client):
    from db.session import get_sessionmaker

    client = make_client(CSRA_API_KEY=BOOTSTRAP)
    with get_sessionmaker()() as db:
        keys = {"agent": create_key(db, "alice", Role.AGENT).secret, "admin": create_key(db, "boss", Role.ADMIN).secret,
                "revoked": create_key(db, "gone", Role.AGENT).secret, "bootstrap": BOOTSTRAP}
        revoke_key(db, "gone")
    return client, keys


def _operations(client) -> list[tuple[str, str, str | None]]:
    spec = client.get("/openapi.json").json()
    return [(method.upper(), path, op.get("x-csra-role")) for path, ops in spec["paths"].items()
            for method, op in ops.items()]


def _call(client, method: str, path: str, key: str | None):
    url = re.sub(r"\{[^}]+\}", "1", path)  # any id: a missing row is a 404, after the role check
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if method in ("POST", "PUT", "PATCH"):
        return client.request(method, url, json={}, headers=headers)
    return client.request(method, url, headers=headers)


def test_every_route_but_health_states_a_role(keyed):
    client, _ = keyed
    ops = _operations(client)
    assert len(ops) > 40
    assert [(m, p) for m, p, role in ops if role is None] == [("GET", "/health")]
    assert {role for _, _, role in ops} == {None, "agent", "admin"}


def test_each_role_gets_the_answer_its_route_states(keyed):
    client, keys = keyed
    for method, path, role in _operations(client):
        if role is None:
            continue
        where = f"{method} {path}"
        for key in (None, keys["revoked"], "csra_not-a-key", "wrong"):
            r = _call(client, method, path, key)
            assert r.status_code == 401 and r.json()["detail"], (where, key, r.status_code)
        for who in ("agent", "admin", "bootstrap"):
            r = _call(client, method, path, keys[who])
            if role == "admin" and who == "agent":
                assert r.status_code == 403 and "admin key" in r.json()["detail"], (where, who, r.status_code)
            else:
                assert r.status_code not in (401, 403) and r.status_code < 500, (where, who, r.status_code, r.text)


def test_readme_role_table_matches_the_routes(keyed):
    """The README's role table is the routes' own roles, not a second list kept by hand."""
    client, _ = keyed
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) ([^`]+)` \| (admin|agent|public) \|", README.read_text(),
                      re.MULTILINE)
    documented = {(m, p): role for m, p, role in rows}
    actual = {(m, p): role or "public" for m, p, role in _operations(client)}
    assert documented == actual


def test_without_keys_the_local_caller_is_an_admin(make_client):
    client = make_client()
    assert client.get("/datasets").status_code == 200
    assert client.put("/profile", json={}).status_code == 200


def test_agents_see_only_their_own_rows_and_admins_see_all(keyed):
    from db.models import ChatSession, Job
    from db.session import get_sessionmaker

    client, keys = keyed
    with get_sessionmaker()() as db:
        db.add_all([ChatSession(title="alice's", owner="alice"), ChatSession(title="bob's", owner="bob"),
                    ChatSession(title="before keys", owner=None),
                    Job(kind="generate", queue="generate", status="succeeded", params={}, owner="alice"),
                    Job(kind="generate", queue="generate", status="succeeded", params={}, owner="bob"),
                    Job(kind="train", queue="train", status="queued", params={}, owner=None)])
        db.commit()
        ids = {c.title: c.id for c in db.query(ChatSession)}
        job_of = {j.owner: j.id for j in db.query(Job)}

    def get(path, who):
        return client.get(path, headers={"Authorization": f"Bearer {keys[who]}"})

    assert [c["title"] for c in get("/chats", "agent").json()["data"]] == ["alice's"]
    assert {c["owner"] for c in get("/chats", "admin").json()["data"]} == {"alice", "bob", None}
    assert get(f"/chats/{ids['bob' + chr(39) + 's']}", "agent").status_code == 404
    assert get(f"/chats/{ids['before keys']}", "agent").status_code == 404  # no shared null-owner rows
    assert get(f"/chats/{ids['before keys']}", "admin").status_code == 200
    export = get("/chats/export?format=jsonl", "agent").text
    assert "alice's" in export and "bob's" not in export and "before keys" not in export
    assert [j["owner"] for j in get("/jobs", "agent").json()["data"]] == ["alice"]
    assert {j["owner"] for j in get("/jobs", "admin").json()["data"]} == {"alice", "bob", None}
    r = client.post(f"/jobs/{job_of['bob']}/cancel", headers={"Authorization": f"Bearer {keys['agent']}"})
    assert r.status_code == 404  # another agent's job does not exist for alice
    r = client.post(f"/jobs/{job_of[None]}/cancel", headers={"Authorization": f"Bearer {keys['agent']}"})
    assert r.status_code == 404
    assert get(f"/jobs/{job_of[None]}", "admin").json()["owner"] is None


def test_a_stored_key_with_the_bootstrap_keys_name_is_refused(keyed):
    """Made before CSRA_API_KEY_NAME changed to it (the CLI refuses the name in use): it would own the
    bootstrap admin's rows, so it is refused."""
    from db.session import get_sessionmaker

    client, _ = keyed
    with get_sessionmaker()() as db:
        twin = create_key(db, "admin", Role.AGENT).secret
    r = client.get("/chats", headers={"Authorization": f"Bearer {twin}"})
    assert r.status_code == 401 and "bootstrap key's name" in r.json()["detail"]
