"""The role matrix of the benchmark report and the figure downloads (every role: anonymous,
organizer, inventor of team A, inventor of team B, analyst; SQLite and PostgreSQL): the published
report and figures to anyone, ``scope=all`` to organizers only; the unpublished submission and its
scores appear in nobody's report but the organizers' ``scope=all`` one, and in no public figure."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.enums import SubmissionState
from services.db.models import Algorithm, Case, Submission, TestSet
from services.db.session import create_db_engine
from tests.integration.services.conftest import score_two_organs

ROLES = ("anon", "inv_a", "inv_b", "ana", "org")
#: one section (organ average, DSC) keeps each report small
SECTION = "organ=average&metric=dsc"


@pytest.fixture
def scene(world, settings):
    """team A: a published (mean DSC ~0.88) and an unpublished scored submission (~0.48), 3 hidden
    cases and a public-sample one, 2 organs; k = 1 (who sees what is tested here, the small-cell
    rule in tests/integration/leaderboard)."""
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with Session(engine) as s:
        algo = s.scalar(sa.select(Algorithm).where(Algorithm.name == "algo-a"))
        cases = list(s.scalars(sa.select(Case).order_by(Case.id)))
        s.get(TestSet, world["testset_id"]).min_group_size = 1
        ids = {}
        for state, base, sha in ((SubmissionState.published, 0.9, "a"), (SubmissionState.scored, 0.5, "b")):
            sub = Submission(algorithm_id=algo.id, testset_id=world["testset_id"], team_id=algo.team_id, state=state,
                             image_sha256=sha * 64)
            s.add(sub)
            s.flush()
            score_two_organs(s, sub.id, cases, base)
            ids[state.value] = sub.id
        s.commit()
    engine.dispose()
    return ids


def _get(client, world, role, path):
    return client.get("/api/v1" + path, headers=world["headers"].get(role, {}))


def test_report_and_figure_role_matrix_and_contents(client, world, scene):
    public = {r: 200 for r in ROLES}
    org_only = {"anon": 401, "inv_a": 403, "inv_b": 403, "ana": 403, "org": 200}
    table = [
        (f"/leaderboards/ts1/report?{SECTION}", public, "text/html"),
        (f"/leaderboards/ts1/report?scope=all&{SECTION}", org_only, "text/html"),
        ("/leaderboards/ts1/figures/boxes.svg?organ=liver", public, "image/svg+xml"),
        ("/leaderboards/ts1/figures/boxes.svg?organ=liver&scope=all", org_only, "image/svg+xml"),
        ("/leaderboards/ts1/figures/hospitals.png?scope=all", org_only, "image/png"),
        ("/leaderboards/ts1/figures/subgroups.svg?variable=sex&scope=all", org_only, "image/svg+xml"),
        ("/leaderboards/nope/report", {**public}, None),
    ]
    mismatches = []
    for path, expected, media in table:
        for role in ROLES:
            response = _get(client, world, role, path)
            want = expected[role] if media else 404
            if response.status_code != want:
                mismatches.append(f"{role} {path}: {response.status_code} != {want} {response.text[:200]}")
            elif want == 200:
                assert response.headers["content-type"].startswith(media), (role, path)
            else:
                assert response.json()["detail"], (role, path)
    assert not mismatches, "\n".join(mismatches)

    # what each report holds (the same scene: the figures are cached per statistics run)
    published, unpublished = scene["published"], scene["scored"]
    for role in ROLES:
        html = _get(client, world, role, f"/leaderboards/ts1/report?{SECTION}").text
        assert f'data-sid="{published}"' in html, role
        assert f'data-sid="{unpublished}"' not in html and f"#{unpublished}" not in html, role
        assert 'data-scope="published"' in html
        svg = _get(client, world, role, "/leaderboards/ts1/figures/boxes.svg?organ=liver").text
        assert "algo-a" in svg and f"#{unpublished}" not in svg, role
    # the page download (no token at all): the published report too
    page = client.get(f"/leaderboards/ts1/report.html?download=1&{SECTION}")
    assert page.status_code == 200 and f'data-sid="{unpublished}"' not in page.text
    assert "attachment" in page.headers["content-disposition"]
    everything = _get(client, world, "org", f"/leaderboards/ts1/report?scope=all&{SECTION}").text
    assert f'data-sid="{unpublished}"' in everything and f'data-sid="{published}"' in everything
    assert 'data-scope="all"' in everything and "organizers' view" in everything
