"""Lesion metrics from scoring to the leaderboard (issue 12, item 4), on a SQLite file migrated by
Alembic and on a fresh PostgreSQL database: a tumour phantom test set (touchstone-lesions), two
published submissions scored by the one scoring path (evaluation.scoring.score_case) and stored
by the worker's insert (worker.pipeline.insert_scores_ignore); their lesion metrics and
per-lesion records are stored, the statistics rank by them with the registry's directions, the
API and pages offer them only for the lesion test set, and the exports carry them (per-lesion
rows: public-sample cases only for non-organizers)."""

from __future__ import annotations

import csv
import io as stdio
import math
from collections.abc import Iterator

import numpy as np
import pytest
import sqlalchemy as sa

from evaluation.metric_registry import HIGHER_IS_BETTER, LESION_METRICS
from tests.factories import add_algorithm, add_submission

pytestmark = pytest.mark.slow  # ~40 s: scores 2 x 5 tumour phantoms, statistics on SQLite and PostgreSQL

N_CASES = 5
DETECTORS = {"finds-all": "realistic", "misses-small": "miss_small_lesions"}
#: the lesion class whose leaderboard values are checked against the score rows (the two detectors
#: differ there on these phantoms)
CLASS = "pancreatic_lesion"


@pytest.fixture(scope="module")
def scored_tumours(tmp_path_factory) -> dict:
    """The tumour phantom set and both detectors' score rows (scored once for every database)."""
    from evaluation import io
    from evaluation.phantoms import generate_cases, make_prediction, write_phantom_set
    from evaluation.protocols import load_protocol
    from evaluation.scoring import score_case

    root = tmp_path_factory.mktemp("lesion-board")
    proto = load_protocol("touchstone-lesions")
    manifest = write_phantom_set(root / "tumours", N_CASES, public_sample=1, size="small", seed=5, lesions=True)
    stored = {}
    for case in generate_cases(N_CASES, n_hospitals=3, size="small", seed=5, lesions=True):
        for seed, (name, kind) in enumerate(DETECTORS.items()):
            pred, _ = make_prediction(case.labels, case.affine, kind, seed=seed, min_lesion_voxels=40)
            folder = root / "pred" / name / case.case_id
            io.write_combined_labels(folder, pred, case.affine)
            rows = score_case(case.case_id, root / "tumours" / case.case_id, folder, proto)
            stored[(name, case.case_id)] = {r.organ: r for r in rows}
    return {"root": root, "manifest": manifest, "proto": proto, "rows": stored}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def lesion_world(request, scored_tumours, tmp_path_factory) -> Iterator[dict]:
    import contextlib

    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    from services.api.app import create_app
    from services.config import Settings, get_settings
    from services.db import migrate
    from services.db.accounts import create_user
    from services.db.enums import Role, SubmissionState
    from services.db.models import Case, Team
    from services.db.session import create_db_engine
    from services.db.testsets import import_testset
    from services.importers import import_touchstone
    from services.leaderboard import on_submission_scored
    from tests.integration.leaderboard.conftest import MODELS, use_database, write_touchstone_dir
    from worker import pipeline

    root = tmp_path_factory.mktemp(f"lesion-{request.param}")
    proto, stored = scored_tumours["proto"], scored_tumours["rows"]
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{root / 'touchstone.db'}"
        else:
            url = stack.enter_context(request.getfixturevalue("new_postgres_database")("touchstone_lesions"))
        mp = pytest.MonkeyPatch()
        stack.callback(get_settings.cache_clear)
        stack.callback(mp.undo)
        use_database(mp, url, root / "data")
        migrate.upgrade("head", url)
        engine = create_db_engine(url)
        stack.callback(engine.dispose)
        tokens, ids = {}, {}
        with Session(engine, expire_on_commit=False) as session:
            for name, role, team in (("org", Role.organizer, None), ("ana", Role.analyst, None),
                                     ("alice", Role.inventor, "Alpha")):
                _, tokens[name] = create_user(session, name, role, team)
            testset = import_testset(session, "tumours", scored_tumours["manifest"], protocol="touchstone-lesions",
                                     settings=get_settings())
            testset.min_group_size = 1
            import_touchstone(session, write_touchstone_dir(root / "organ", MODELS), "abdomen-ct")  # an organ test set
            team = session.scalar(sa.select(Team).where(Team.name == "Alpha"))
            cases = session.scalars(sa.select(Case).where(Case.testset_id == testset.id).order_by(Case.case_id)).all()
            for name in DETECTORS:
                submission = add_submission(session, add_algorithm(session, name, team=team), testset,
                                            SubmissionState.published)
                ids[name] = submission.id
                for case in cases:
                    pipeline.insert_scores_ignore(session, submission.id, case.id, proto.key,
                                                  list(stored[(name, case.case_id)].values()))
            session.flush()
            for submission_id in ids.values():
                on_submission_scored(session, submission_id)
            session.commit()
            public = {c.case_id for c in cases if c.public_sample}
        with TestClient(create_app(Settings(database_url=url, data_dir=root / "data"))) as client:
            yield {"client": client, "url": url, "tokens": tokens, "ids": ids, "rows": stored, "public": public,
                   "proto": proto}


def _headers(world, who):
    return {"Authorization": f"Bearer {world['tokens'][who]}"}


def test_lesion_metrics_and_lesions_are_stored(lesion_world):
    from services.db.models import Case, Lesion, Score

    engine = sa.create_engine(lesion_world["url"])
    with engine.connect() as conn:
        scores = conn.execute(sa.select(Score, Case.case_id.label("case_name")).join(Case, Case.id == Score.case_id)
                              .where(Score.submission_id.in_(list(lesion_world["ids"].values())))).all()
        lesions = conn.execute(sa.select(Lesion)).all()
    engine.dispose()
    by_id = {name: i for i, name in lesion_world["ids"].items()}
    lesion_classes = set(lesion_world["proto"].lesions)
    n_lesion_rows = 0
    for row in scores:
        scored = lesion_world["rows"][(by_id[row.submission_id], row.case_name)][row.organ]
        for metric in LESION_METRICS:
            value, expected = getattr(row, metric), scored.value(metric)
            if row.organ in lesion_classes and expected is not None and math.isfinite(expected):
                assert value == pytest.approx(expected, abs=1e-12), (row.organ, metric)
            else:
                assert value is None, (row.organ, metric)
        n_lesion_rows += len(scored.lesions)
    assert any(getattr(r, "lesion_f1") is not None for r in scores)
    assert len(lesions) == n_lesion_rows > 0
    assert {lesion.side for lesion in lesions} == {"truth", "prediction"}


def test_leaderboard_ranks_by_lesion_metrics_with_their_direction(lesion_world):
    client = lesion_world["client"]
    f1 = client.get("/api/v1/leaderboards/tumours", params={"metric": "lesion_f1", "organ": CLASS})
    assert f1.status_code == 200, f1.text
    entries = f1.json()["entries"]
    assert {e["submission_id"] for e in entries} == set(lesion_world["ids"].values())
    values = [e["value"] for e in entries]
    assert values == sorted(values, reverse=True)  # higher F1 is better
    # the mean lesion F1 over the hidden cases, from the score rows themselves, under the
    # test set's missing-case policy (worst): a case some submission scored for the class but this
    # one did not (e.g. nothing in truth, nothing predicted) counts with the protocol's worst value
    rows, proto = lesion_world["rows"], lesion_world["proto"]
    hidden = sorted({c for (_, c) in rows} - lesion_world["public"])

    def scored(row) -> bool:
        return any(v is not None and math.isfinite(v) for v in (row.dsc, row.nsd, *row.lesion_metrics.values()))

    expected_cells = {c for c in hidden if any(scored(rows[(n, c)][CLASS]) for n in DETECTORS)}
    by_id = {i: name for name, i in lesion_world["ids"].items()}
    for entry in entries:
        name = by_id[entry["submission_id"]]
        mine = []
        for case in hidden:
            value = rows[(name, case)][CLASS].value("lesion_f1")
            if (value is None or not math.isfinite(value)) and case in expected_cells:
                value = proto.worst["lesion_f1"]
            mine.append(np.nan if value is None else value)
        assert entry["value"] == pytest.approx(float(np.nanmean(mine)), abs=1e-9)
    # over the lesion classes ("average"): the realistic detector finds more lesions (higher F1)
    # and has more false positives; F1 ranks it first, FP (lower is better) last
    assert HIGHER_IS_BETTER["lesion_fp"] is False
    boards = {}
    for metric in ("lesion_f1", "lesion_fp"):
        response = client.get("/api/v1/leaderboards/tumours", params={"metric": metric})
        assert response.status_code == 200, response.text
        boards[metric] = [(e["submission_id"], e["value"]) for e in response.json()["entries"]]
    f1_values, fp_values = [v for _, v in boards["lesion_f1"]], [v for _, v in boards["lesion_fp"]]
    assert len(set(fp_values)) == 2 and len(set(f1_values)) == 2
    assert f1_values == sorted(f1_values, reverse=True)
    assert fp_values == sorted(fp_values)  # fewer false positives is better: rank 1 has the fewest
    assert boards["lesion_f1"][0][0] == boards["lesion_fp"][1][0] == lesion_world["ids"]["finds-all"]
    page = client.get("/leaderboards/tumours", params={"metric": "lesion_f1", "organ": CLASS})
    assert page.status_code == 200 and "lesion F1" in page.text and "panoptic quality" in page.text
    submission = client.get(f"/leaderboards/tumours/submissions/{lesion_world['ids']['finds-all']}",
                            params={"metric": "lesion_fp", "organ": CLASS})
    assert submission.status_code == 200 and "lesion FP" in submission.text


def test_organ_test_set_refuses_lesion_metrics(lesion_world):
    client = lesion_world["client"]
    response = client.get("/api/v1/leaderboards/abdomen-ct", params={"metric": "lesion_f1"})
    assert 400 <= response.status_code < 500, response.text
    assert "lesion_f1" in response.text and "dsc, nsd" in response.text
    page = client.get("/leaderboards/abdomen-ct", params={"metric": "lesion_f1"})
    assert page.status_code == 422 and "dsc, nsd" in page.text
    organ = client.get("/api/v1/leaderboards/abdomen-ct", params={"metric": "dsc"})
    assert organ.status_code == 200


def _csv(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return list(csv.DictReader(stdio.StringIO(response.text)))


def test_exports_carry_lesion_metrics_and_lesions(lesion_world):
    from services.exports import COLUMNS

    client = lesion_world["client"]
    url = "/api/v1/exports/tumours"
    rows = _csv(client.get(url, params={"level": "case", "scope": "all"}, headers=_headers(lesion_world, "org")))
    assert list(rows[0]) == COLUMNS["case"] and set(LESION_METRICS) <= set(rows[0])
    by_id = {str(i): name for name, i in lesion_world["ids"].items()}
    for row in rows:
        scored = lesion_world["rows"][(by_id[row["submission_id"]], row["case_id"])][row["organ"]]
        f1 = scored.value("lesion_f1")
        assert (row["lesion_f1"] == "") == (f1 is None or not math.isfinite(f1))
        if row["lesion_f1"]:
            assert float(row["lesion_f1"]) == pytest.approx(f1, abs=1e-12)
    lesions = _csv(client.get(url, params={"level": "lesion", "scope": "all"}, headers=_headers(lesion_world, "org")))
    assert list(lesions[0]) == COLUMNS["lesion"]
    expected = sum(len(r.lesions) for rows_ in lesion_world["rows"].values() for r in rows_.values())
    assert len(lesions) == expected
    assert {r["matched"] for r in lesions} == {"True", "False"}  # found lesions and missed ones
    for r in lesions:
        assert (r["matched"] == "True") == (r["matched_to"] != "")
        if r["matched"] == "False":
            assert float(r["dsc"]) == 0.0
    # an analyst: public-sample cases only, as at case level
    shown = _csv(client.get(url, params={"level": "lesion"}, headers=_headers(lesion_world, "ana")))
    assert {r["case_id"] for r in shown} <= lesion_world["public"]
    assert len(shown) == sum(1 for r in lesions if r["case_id"] in lesion_world["public"])
    bad = client.get(url, params={"level": "tumour"}, headers=_headers(lesion_world, "org"))
    assert bad.status_code == 422 and "lesion" in bad.text
