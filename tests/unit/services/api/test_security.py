"""In-process checks of the API's input bounds, headers and /metrics access (SQLite)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app, create_metrics_app
from services.config import Settings
from services.db import migrate
from services.db.accounts import create_user


@pytest.fixture
def make_client(tmp_path):
    def make(**overrides):
        overrides.setdefault("data_dir", tmp_path / "data")
        settings = Settings(**overrides)
        migrate.upgrade("head", settings.database_url)
        app = create_app(settings)
        with app.state.sessionmaker() as session:
            tokens = {role: create_user(session, f"u-{role}", role, "team-x" if role == "inventor" else None)[1]
                      for role in ("organizer", "inventor", "analyst")}
            session.commit()
        client = TestClient(app, raise_server_exceptions=False)
        client.tokens = {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}
        return client

    return make


def test_body_fields_are_bounded(make_client):
    client = make_client()
    org = client.tokens["organizer"]
    for field, value in [("memory_bytes", 2**70), ("quota_submissions", 2**63), ("shard_size", 2**40),
                         ("time_per_case_s", 1e300), ("pids_limit", 2**31), ("shm_bytes", 2**64)]:
        response = client.patch("/api/v1/testsets/anything", headers=org, json={field: value})
        assert response.status_code == 422, (field, response.text)
        assert field in response.json()["detail"]


def test_nul_and_surrogates_in_text_are_422(make_client):
    client = make_client()
    org = client.tokens["organizer"]
    for body in (b'{"name": "a\\u0000b"}', b'{"name": "team", "x": 1, "name": "\\ud800"}'):
        response = client.post("/api/v1/teams", headers={**org, "content-type": "application/json"}, content=body)
        assert response.status_code == 422, response.text
    response = client.post("/api/v1/users", headers=org, json={"name": "n", "role": "analyst", "team": "a\x00"})
    assert response.status_code == 422
    assert client.get("/api/v1/testsets/a%00b", headers=org).status_code == 422
    assert client.get("/api/v1/leaderboards?scope=%00", headers=org).status_code == 422


def test_body_limit_applies_before_authentication_but_not_to_uploads(make_client):
    client = make_client(max_request_body_bytes=1000)
    response = client.post("/api/v1/teams", content=b"{" + b" " * 2000 + b"}", headers={"content-type": "application/json"})
    assert response.status_code == 413 and "1000 bytes" in response.json()["detail"]

    def chunks():
        for _ in range(10):
            yield b" " * 500

    response = client.post("/api/v1/teams", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    # the image upload keeps its own (max_upload_bytes) limit: no 413 from the body limit for 2 kB
    response = client.post("/api/v1/submissions", headers=client.tokens["inventor"],
                           files={"image": ("i.tar", b"x" * 2000, "application/x-tar")}, data={"algorithm": "a"})
    assert response.status_code != 413


def test_a_500_carries_the_security_headers(make_client):
    client = make_client()

    @client.app.get("/boom")
    def boom():
        raise RuntimeError("boom")

    response = client.get("/boom")
    assert response.status_code == 500
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_metrics_access_and_team_storage(make_client, tmp_path):
    client = make_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=client.tokens["analyst"]).status_code == 403
    scrape = client.get("/metrics", headers=client.tokens["organizer"])
    assert scrape.status_code == 200 and 'touchstone_team_storage_bytes{team="team-x"} 0.0' in scrape.text

    public = make_client(metrics_public=True, data_dir=tmp_path / "public")
    anonymous = public.get("/metrics")
    assert anonymous.status_code == 200 and "touchstone_submissions" in anonymous.text
    assert "touchstone_team_storage_bytes" not in anonymous.text  # team names: organizers only

    internal = TestClient(create_metrics_app(Settings(data_dir=tmp_path / "data")))
    response = internal.get("/metrics")
    assert response.status_code == 200 and "touchstone_team_storage_bytes" in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


def test_import_roots_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOUCHSTONE_IMPORT_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    assert Settings().import_roots == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("TOUCHSTONE_IMPORT_ROOTS", f'["{tmp_path}/c"]')
    assert Settings().import_roots == [tmp_path / "c"]


def test_redirects_do_not_follow_the_host_header(make_client):
    """Found by review: the trailing-slash redirect answered Location: http://<any Host>/..."""
    client = make_client()
    response = client.get("/leaderboards/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.status_code in (307, 308)
    assert response.headers["location"] == "/leaderboards"
    assert response.headers["x-content-type-options"] == "nosniff"
    home = client.get("/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert home.headers["location"] == "/leaderboards"
