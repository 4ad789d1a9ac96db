from __future__ import annotations


def test_api_key_guards_everything_but_health(make_client):
    client = make_client(CSRA_API_KEY="s3cret")
    assert client.get("/health").status_code in (200, 503)  # public (Redis is down here: 503)
    r = client.get("/jobs")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/jobs", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json() == {"data": [], "count": 0}
    assert client.get("/datasets", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_without_a_key_the_api_is_open(make_client):
    client = make_client()
    assert client.get("/jobs").status_code == 200


def test_submissions_answer_503_when_redis_is_down(make_client, bitext_path):
    client = make_client(CSRA_IMPORT_ROOTS=f'["{bitext_path.parent}"]')
    r = client.post("/datasets", json={"name": "b", "source": str(bitext_path)})
    assert r.status_code == 503 and "CSRA_REDIS_URL" in r.json()["detail"]
    assert client.get("/datasets").json()["count"] == 0 and client.get("/jobs").json()["count"] == 0


def test_unknown_things_are_404_with_a_detail(make_client):
    client = make_client()
    for path in ("/jobs/5", "/datasets/5", "/models/nope", "/jobs/5/events"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["detail"], path
    assert client.get("/jobs", params={"status": "weird"}).status_code == 422
