"""The role matrix: every endpoint x every role (anonymous, organizer, inventor of team A, inventor of
team B, analyst), on SQLite and PostgreSQL, and what each response contains: no other team's
submission and no hidden per-case result may leak. The statistics are stored by the real entry point
(``services.leaderboard.on_submission_scored``), as ``finalize`` does after scoring."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.enums import SubmissionState
from services.db.models import Algorithm, Case, Score, Submission, TestSet
from services.db.session import create_db_engine
from services.leaderboard import on_submission_scored
from tests.integration.services.conftest import score_two_organs

ROLES = ("anon", "inv_a", "inv_b", "ana", "org")


@pytest.fixture
def scene(world, settings):
    """team A: a published and an unpublished scored submission; team B: a received one.
    Every scored submission has scores on all 4 cases (1 public-sample) for 2 organs."""
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with Session(engine) as s:
        algos = {a.name: a for a in s.scalars(sa.select(Algorithm))}
        cases = list(s.scalars(sa.select(Case).order_by(Case.id)))
        # 3 hidden cases: below any real small-cell threshold; this file tests who sees what, the
        # suppression rule has its own tests (tests/integration/leaderboard/test_small_cells.py)
        s.get(TestSet, world["testset_id"]).min_group_size = 1

        def submission(algo: str, state: SubmissionState, sha: str) -> Submission:
            a = algos[algo]
            sub = Submission(algorithm_id=a.id, testset_id=world["testset_id"], team_id=a.team_id, state=state,
                             image_sha256=sha * 64, validation_log=f"log of {algo} {state.value}")
            s.add(sub)
            s.flush()
            return sub

        published = submission("algo-a", SubmissionState.published, "a")
        unpublished = submission("algo-a", SubmissionState.scored, "b")
        other = submission("algo-b", SubmissionState.received, "c")
        for sub, base in ((published, 0.9), (unpublished, 0.5)):
            score_two_organs(s, sub.id, cases, base)
        s.commit()
        ids = {"published": published.id, "unpublished": unpublished.id, "other": other.id,
               "algo_a": algos["algo-a"].id, "algo_b": algos["algo-b"].id,
               "inv_a_user": None}
        ids["public_case"] = next(c.case_id for c in cases if c.public_sample)
    engine.dispose()
    return ids


def _call(client, world, role, method, path, json=None):
    headers = world["headers"].get(role, {})
    return client.request(method, "/api/v1" + path, headers=headers, json=json)


def test_role_matrix(client, world, scene, manifest_csv):
    P, U, O = scene["published"], scene["unpublished"], scene["other"]
    A, B = scene["algo_a"], scene["algo_b"]
    me = {"anon": 401, "inv_a": 200, "inv_b": 200, "ana": 200, "org": 200}
    org_only = {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 403, "org": 200}
    org_created = {**org_only, "org": 201}
    public = {r: 200 for r in ROLES}
    authed = {**public, "anon": 401}

    # one row per endpoint with its answer per role, spelled out deliberately: the matrix is the specification, and
    # rows alike in shape read (and fail) one by one.
    table = [
        ("GET", "/users/me", None, me),
        ("GET", "/users", None, org_only),
        ("POST", "/users", lambda r: {"name": f"new-{r}", "role": "analyst"}, org_created),
        ("GET", "/teams", None, org_only),
        ("POST", "/teams", lambda r: {"name": f"team-{r}"}, org_created),
        ("GET", "/users/1/tokens", None, org_only),
        ("POST", "/users/1/tokens", lambda r: {"label": r}, org_created),
        ("GET", "/testsets", None, public),
        ("GET", "/testsets/ts1", None, public),
        ("PATCH", "/testsets/ts1", lambda r: {"quota_submissions": 5}, org_only),
        ("POST", "/testsets", lambda r: {"name": f"ts-{r}", "manifest_path": str(manifest_csv)}, org_created),
        ("GET", "/testsets/ts1/cases", None, authed),
        ("GET", "/algorithms", None, authed),
        ("GET", f"/algorithms/{A}", None, {"anon": 401, "inv_a": 200, "inv_b": 404, "ana": 200, "org": 200}),
        ("GET", f"/algorithms/{B}", None, {"anon": 401, "inv_a": 404, "inv_b": 200, "ana": 404, "org": 200}),
        ("POST", "/algorithms", lambda r: {"name": f"algo-new-{r}", "team": "team-a" if r == "org" else None},
         {"anon": 401, "inv_a": 201, "inv_b": 201, "ana": 403, "org": 201}),
        ("GET", "/submissions", None, authed),
        ("GET", f"/submissions/{P}", None, {"anon": 401, "inv_a": 200, "inv_b": 404, "ana": 200, "org": 200}),
        ("GET", f"/submissions/{U}", None, {"anon": 401, "inv_a": 200, "inv_b": 404, "ana": 404, "org": 200}),
        ("GET", f"/submissions/{O}", None, {"anon": 401, "inv_a": 404, "inv_b": 200, "ana": 404, "org": 200}),
        ("GET", f"/submissions/{P}/logs", None, {"anon": 401, "inv_a": 200, "inv_b": 404, "ana": 403, "org": 200}),
        ("GET", f"/submissions/{O}/logs", None, {"anon": 401, "inv_a": 404, "inv_b": 200, "ana": 404, "org": 200}),
        ("GET", f"/submissions/{P}/shards", None, org_only),
        # per-case scores of one submission (own team: public-sample cases only)
        ("GET", f"/results/submissions/{P}/scores", None, {"anon": 401, "inv_a": 200, "inv_b": 404, "ana": 200, "org": 200}),
        ("GET", f"/results/submissions/{U}/scores", None, {"anon": 401, "inv_a": 200, "inv_b": 404, "ana": 404, "org": 200}),
        ("GET", f"/results/submissions/{O}/scores", None, {"anon": 401, "inv_a": 404, "inv_b": 200, "ana": 404, "org": 200}),
        # the leaderboard (stored statistics): published to anyone, scope=all to organizers
        ("GET", "/leaderboards", None, public),
        ("GET", "/leaderboards?scope=all", None, org_only),
        ("GET", "/leaderboards/ts1", None, public),
        ("GET", "/leaderboards/ts1?scope=all", None, org_only),
        ("GET", "/leaderboards/ts1?organ=liver&method=rank-mean", None, public),
        ("GET", "/leaderboards/ts1/significance", None, public),
        ("GET", "/leaderboards/ts1/significance?scope=all", None, org_only),
        ("GET", "/leaderboards/ts1/stability", None, public),
        ("GET", "/leaderboards/ts1/stability?scope=all", None, org_only),
        ("GET", "/leaderboards/ts1/hospitals", None, public),
        ("GET", "/leaderboards/ts1/hospitals?scope=all", None, org_only),
        ("GET", "/leaderboards/ts1/subgroups/sex", None, public),
        ("GET", "/leaderboards/ts1/subgroups/sex?scope=all", None, org_only),
        ("GET", f"/leaderboards/ts1/submissions/{P}", None, public),
        ("GET", f"/leaderboards/ts1/submissions/{U}", None, {"anon": 404, "inv_a": 403, "inv_b": 404, "ana": 404, "org": 200}),
        ("GET", f"/leaderboards/ts1/submissions/{O}", None, {"anon": 404, "inv_a": 404, "inv_b": 403, "ana": 404, "org": 404}),
        ("GET", f"/leaderboards/ts1/submissions/{P}/cases", None, {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 200, "org": 200}),
        ("GET", f"/leaderboards/ts1/submissions/{U}/cases", None, {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 404, "org": 200}),
        ("GET", "/exports", None, {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 200, "org": 200}),
        ("GET", "/exports/ts1?level=case", None, {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 200, "org": 200}),
        ("GET", "/exports/ts1?level=case&scope=all", None, org_only),
        ("GET", "/exports/ts1?level=hospital", None, {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 200, "org": 200}),
        # state-changing organizer actions last (non-organizers first, so they act on the same state)
        ("POST", f"/submissions/{U}/publish", None, org_only),
        ("POST", f"/submissions/{U}/unpublish", None, org_only),
        ("POST", f"/submissions/{O}/cancel", lambda r: {"reason": "test"}, org_only),
        ("POST", f"/submissions/{O}/rerun", None, {**org_only, "org": 202}),
        ("POST", "/submissions", None, {"anon": 401, "inv_a": 415, "inv_b": 415, "ana": 403, "org": 415}),
    ]
    mismatches = []
    for method, path, body, expected in table:
        for role in ROLES:
            response = _call(client, world, role, method, path, body(role) if callable(body) else body)
            if response.status_code != expected[role]:
                mismatches.append(f"{role} {method} {path}: {response.status_code} != {expected[role]} {response.text[:200]}")
            media = "text/csv" if path.startswith("/exports/") and response.status_code == 200 else "application/json"
            assert response.headers["content-type"].startswith(media), (role, method, path)
            if response.status_code >= 400:
                assert isinstance(response.json().get("detail"), str) and response.json()["detail"]
    assert not mismatches, "\n".join(mismatches)


def test_lists_show_only_what_each_role_may_see(client, world, scene):
    P, U, O = scene["published"], scene["unpublished"], scene["other"]

    def ids(role, path):
        response = _call(client, world, role, "GET", path)
        assert response.status_code == 200, response.text
        return response.json()

    assert {s["id"] for s in ids("org", "/submissions")} == {P, U, O}
    assert {s["id"] for s in ids("inv_a", "/submissions")} == {P, U}
    assert {s["id"] for s in ids("inv_b", "/submissions")} == {O}
    assert {s["id"] for s in ids("ana", "/submissions")} == {P}
    assert {a["name"] for a in ids("inv_a", "/algorithms")} == {"algo-a"}
    assert {a["name"] for a in ids("inv_b", "/algorithms")} == {"algo-b"}
    assert {a["name"] for a in ids("ana", "/algorithms")} == {"algo-a"}
    assert {a["name"] for a in ids("org", "/algorithms")} == {"algo-a", "algo-b"}

    # hidden cases: inventors see the public sample only, in case lists and in per-case scores
    assert [c["case_id"] for c in ids("inv_a", "/testsets/ts1/cases")] == [scene["public_case"]]
    assert len(ids("ana", "/testsets/ts1/cases")) == 4
    for sub in (P, U):
        own = ids("inv_a", f"/results/submissions/{sub}/scores")
        assert own["total"] == 2 and {i["case_id"] for i in own["items"]} == {scene["public_case"]}
    assert ids("org", f"/results/submissions/{U}/scores")["total"] == 8
    # analysts: the published submission's public-sample rows only (hidden cases reach organizers only)
    analyst = ids("ana", f"/results/submissions/{P}/scores")
    assert analyst["total"] == 2 and {i["case_id"] for i in analyst["items"]} == {scene["public_case"]}

    # per-case scores of another team's submission: not even its existence
    for sub in (P, U):
        assert _call(client, world, "inv_b", "GET", f"/results/submissions/{sub}/scores").status_code == 404

    # the public leaderboard: published only, with the right means over the hidden cases (the
    # public-sample case is the inventors' validation run, not part of the statistics)
    hidden = _case_pks(world, hidden_only=True)
    assert len(hidden) == 3
    expected_liver = sum(0.9 - cid * 0.01 for cid in hidden) / len(hidden)
    for role in ROLES:
        board = ids(role, "/leaderboards/ts1?organ=liver")
        assert [e["submission_id"] for e in board["entries"]] == [P], role
        assert board["entries"][0]["mean"] == pytest.approx(expected_liver)
        assert board["entries"][0]["organs"]["liver"] == pytest.approx(expected_liver)
        average = ids(role, "/leaderboards/ts1")["entries"][0]
        # per-case mean over liver and spleen, equal dsc: the average equals the liver mean
        assert average["mean"] == pytest.approx(expected_liver)
        for path in ("/leaderboards/ts1/significance", "/leaderboards/ts1/stability", "/leaderboards/ts1/hospitals",
                     "/leaderboards/ts1/subgroups/sex", f"/leaderboards/ts1/submissions/{P}", "/leaderboards"):
            text = _call(client, world, role, "GET", path).text
            # the unpublished submission and its (lower) scores appear nowhere
            assert f'"submission_id":{U}' not in text.replace(" ", ""), (role, path)
            assert f'"b":{U}' not in text.replace(" ", "") and f'"a":{U}' not in text.replace(" ", ""), (role, path)
        assert ids(role, "/leaderboards")[0]["n_submissions"] == 1
    # organizers see both in scope=all, the scored one ranked below
    everything = ids("org", "/leaderboards/ts1?scope=all&organ=liver")
    assert [e["submission_id"] for e in everything["entries"]] == [P, U]
    assert everything["entries"][1]["mean"] == pytest.approx(expected_liver - 0.4)
    assert ids("org", f"/leaderboards/ts1/submissions/{U}")["aggregates"]
    # per-case rows of the leaderboard router: analysts the published one, its public-sample case x 2 organs
    assert ids("ana", f"/leaderboards/ts1/submissions/{P}/cases")["total"] == 2
    # analysts' case-level export holds the published submission only
    export = _call(client, world, "ana", "GET", "/exports/ts1?level=case").text.splitlines()
    header = export[0].split(",")
    column = header.index("submission_id")
    assert {row.split(",")[column] for row in export[1:]} == {str(P)} and len(export) == 1 + 2


def _case_pks(world, hidden_only: bool = False):
    engine = create_db_engine(str(world["settings"].database_url), poolclass=sa.pool.NullPool)
    query = sa.select(Case.id).where(Case.public_sample.is_(False)) if hidden_only else sa.select(Case.id)
    with engine.connect() as conn:
        pks = list(conn.scalars(query))
    engine.dispose()
    return pks


def test_bad_tokens_are_401_with_a_hint(client, world):
    for header in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        response = client.get("/api/v1/users/me", headers=header)
        assert response.status_code == 401
        assert "token" in response.json()["detail"].lower() or "bearer" in response.json()["detail"].lower()


def test_revoked_token_stops_working(client, world):
    headers = world["headers"]["org"]
    me = client.get("/api/v1/users/me", headers=world["headers"]["inv_b"]).json()
    tokens = client.get(f"/api/v1/users/{me['id']}/tokens", headers=headers).json()
    assert client.delete(f"/api/v1/tokens/{tokens[0]['id']}", headers=headers).status_code == 200
    assert client.get("/api/v1/users/me", headers=world["headers"]["inv_b"]).status_code == 401


def test_created_token_is_shown_once_and_stored_hashed(client, world, settings):
    response = client.post("/api/v1/users", headers=world["headers"]["org"],
                           json={"name": "carol", "role": "inventor", "team": "team-c"})
    assert response.status_code == 201
    token = response.json()["token"]
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}).json()["team"] == "team-c"
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        stored = list(conn.execute(sa.text("select token_sha256, prefix from api_tokens")))
    engine.dispose()
    assert all(token not in row[0] for row in stored)
    listed = client.get(f"/api/v1/users/{response.json()['user']['id']}/tokens", headers=world["headers"]["org"]).text
    assert token not in listed


def test_validation_errors_are_readable_422(client, world):
    headers = world["headers"]["org"]
    response = client.post("/api/v1/users", headers=headers, json={"name": "", "role": "wizard"})
    assert response.status_code == 422
    assert "role" in response.json()["detail"] and "name" in response.json()["detail"]
    response = client.post("/api/v1/testsets", headers=headers, json={"name": "x", "manifest_path": "/nope.csv"})
    assert response.status_code == 422 and "/nope.csv" in response.json()["detail"]
    response = client.patch("/api/v1/testsets/ts1", headers=headers, json={"gpus": -1})
    assert response.status_code == 422
    assert client.get("/api/v1/submissions/abc", headers=headers).status_code == 422
    assert client.get("/api/v1/submissions/999999", headers=headers).status_code == 404
    assert client.post("/api/v1/users", headers=headers, content=b"{not json",
                       ).status_code == 422


def test_illegal_transition_is_409(client, world, scene):
    response = client.post(f"/api/v1/submissions/{scene['other']}/publish", headers=world["headers"]["org"])
    assert response.status_code == 409
    assert "received" in response.json()["detail"] and "published" in response.json()["detail"]


def test_rerun_enqueues_validation(client, world, scene, sent_tasks):
    org = world["headers"]["org"]
    assert client.post(f"/api/v1/submissions/{scene['other']}/cancel", headers=org, json={}).status_code == 200
    response = client.post(f"/api/v1/submissions/{scene['other']}/rerun", headers=org)
    assert response.status_code == 202 and response.json()["state"] == "received"
    assert sent_tasks == [("touchstone.validate", [scene["other"]], "cpu")]


def test_openapi_docs_served(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/submissions" in spec["paths"] and "/api/v1/leaderboards/{testset}" in spec["paths"]
    # one leaderboard: the simple duplicate is gone
    assert "/api/v1/results/leaderboard" not in spec["paths"]
    assert not any(path.endswith("/aggregates") for path in spec["paths"])


def test_cached_leaderboard_follows_a_recomputation(client, world, scene, settings):
    """The same submissions in scope, new statistics: the next read shows them (the cache key holds
    the newest stats run, not only the in-scope ids)."""
    P = scene["published"]
    path = "/api/v1/leaderboards/ts1?organ=liver"
    before = client.get(path).json()["entries"][0]["mean"]
    assert client.get(path).json()["entries"][0]["mean"] == before  # served again (cached)
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with Session(engine) as s:
        s.execute(sa.update(Score).where(Score.submission_id == P, Score.organ == "liver").values(dsc=Score.dsc - 0.1))
        on_submission_scored(s, P)
        s.commit()
    engine.dispose()
    assert client.get(path).json()["entries"][0]["mean"] == pytest.approx(before - 0.1)
