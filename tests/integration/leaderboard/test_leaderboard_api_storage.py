"""Stored statistics and the leaderboard API: numbers against independent computations,
visibility by role, publish/unpublish recomputation."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import sqlalchemy as sa
from scipy import stats
from statsmodels.stats.multitest import multipletests

from evaluation.labels import ORGANS

BASE = "/api/v1/leaderboards/abdomen-ct"


def _csv_column(path, organ):
    with open(path, newline="") as handle:
        return {r["name"]: (float(r[organ]) if r[organ] else np.nan) for r in csv.DictReader(handle)}


def test_aggregates_match_the_imported_files(world, session):
    from services.db.models import Aggregate, Algorithm, Submission

    sid = session.scalar(sa.select(Submission.id).join(Algorithm).where(Algorithm.name == "nnU-Net"))
    values = np.array(list(_csv_column(world.root / "results" / "nnU-Net" / "dsc.csv", "gall_bladder").values()))
    row = session.scalar(sa.select(Aggregate).where(
        Aggregate.submission_id == sid, Aggregate.organ == "gall_bladder", Aggregate.metric == "dsc",
        Aggregate.scope == "overall"))
    scored = values[~np.isnan(values)]
    assert row.n == scored.size == 23 and row.n_missing == 1
    assert row.mean == pytest.approx(scored.mean(), abs=1e-12)
    assert row.median == pytest.approx(np.median(scored), abs=1e-12)
    assert row.std == pytest.approx(scored.std(ddof=1), abs=1e-12)
    assert row.ci_low < row.mean < row.ci_high
    # per-hospital rows partition the cases
    per_hospital = session.scalars(sa.select(Aggregate).where(
        Aggregate.submission_id == sid, Aggregate.organ == "gall_bladder", Aggregate.metric == "dsc",
        Aggregate.scope == "hospital")).all()
    assert sorted(a.group_value for a in per_hospital) == ["hospital-A", "hospital-B", "hospital-C"]
    assert sum(a.n for a in per_hospital) == 23


def test_failed_prediction_is_counted(world, client, session):
    from services.db.models import Aggregate

    board = client.get(BASE, params={"organ": "liver", "scope": "all"}, headers=world.headers("org")).json()
    alpha = next(e for e in board["entries"] if e["submission_id"] == world.alpha_id)
    assert alpha["n_failed"] == 1 and alpha["n"] == 24
    # the test set's public-sample case (the validation run) is not part of the statistics
    rows = session.scalars(sa.select(Aggregate).where(
        Aggregate.submission_id == world.alpha_id, Aggregate.scope == "overall")).all()
    assert rows and all(r.n_missing == 0 for r in rows)
    assert alpha["seconds_per_case"] == pytest.approx(np.mean([10.0 + i for i in range(24)]))
    assert alpha["gpu_memory_peak_bytes"] == 3 * 1024**3


def test_pairwise_p_values_match_scipy_and_statsmodels(world, client):
    sig = client.get(f"{BASE}/significance", params={"organ": "liver", "metric": "nsd"}).json()
    assert [s["label"] for s in sig["submissions"]][0] == "nnU-Net"  # the best by mean
    columns = {m: _csv_column(world.root / "results" / m / "nsd.csv", "liver") for m in ("MedNeXt", "nnU-Net", "SwinUNETR")}
    raw = {}
    for a in columns:
        for b in columns:
            if a != b:
                d = np.array([columns[a][c] - columns[b][c] for c in columns[a]])
                raw[(a, b)] = stats.wilcoxon(d, alternative="greater", correction=True, method="approx",
                                             zero_method="wilcox").pvalue
    keys = list(raw)
    adjusted = dict(zip(keys, multipletests([raw[k] for k in keys], method="holm")[1]))
    assert len(sig["pairs"]) == 6
    for pair in sig["pairs"]:
        key = (pair["a_label"], pair["b_label"])
        assert pair["p_value"] == pytest.approx(raw[key], rel=1e-9)
        assert pair["p_adjusted"] == pytest.approx(adjusted[key], rel=1e-9)
        assert pair["significant"] == (adjusted[key] < 0.05)


def test_rankings_stability_and_breakdowns(world, client):
    for method in ("mean", "median", "rank-mean", "test"):
        board = client.get(BASE, params={"method": method}).json()
        assert [e["rank"] for e in board["entries"]] == sorted(e["rank"] for e in board["entries"])
        assert {e["label"] for e in board["entries"]} == {"MedNeXt", "nnU-Net", "SwinUNETR"}
    mean = client.get(BASE, params={"organ": "spleen"}).json()
    assert [e["label"] for e in mean["entries"]] == ["nnU-Net", "MedNeXt", "SwinUNETR"]
    assert all(e["seconds_per_case"] is None for e in mean["entries"])  # baselines: not measured
    stab = client.get(f"{BASE}/stability", params={"organ": "spleen"}).json()
    assert stab["n_resamples"] == 1000
    for entry in stab["entries"]:
        assert sum(entry["rank_counts"]) == 1000 and len(entry["rank_counts"]) == 3
        assert entry["rank_ci_low"] <= entry["median_rank"] <= entry["rank_ci_high"]
    sex = client.get(f"{BASE}/subgroups/sex", params={"metric": "nsd"}).json()
    assert {r["group"] for r in sex["rows"]} == {"F", "M"}
    decades = client.get(f"{BASE}/subgroups/age_decade").json()
    assert {r["group"] for r in decades["rows"]} >= {"20-29", "30-39", "60-69"}
    hospitals = client.get(f"{BASE}/hospitals", params={"organ": "kidney_left"}).json()
    assert len(hospitals["rows"]) == 9


@pytest.mark.parametrize(
    "who, scope, status",
    [(None, "published", 200), ("alice", "published", 200), ("ana", "published", 200), ("org", "published", 200),
     (None, "all", 401), ("alice", "all", 403), ("bob", "all", 403), ("ana", "all", 403), ("org", "all", 200)],
)
def test_visibility_of_scopes(world, client, who, scope, status):
    for path in ("", "/significance", "/stability", "/hospitals", "/subgroups/sex"):
        response = client.get(BASE + path, params={"scope": scope}, headers=world.headers(who))
        assert response.status_code == status, (path, response.text)
        if status == 200:
            body = response.json()
            items = body.get("entries") or body.get("rows") or body.get("submissions")
            # the scored, unpublished submission is in the organizers' scope only
            assert (world.alpha_id in {e["submission_id"] for e in items}) == (scope == "all"), path


@pytest.mark.parametrize(
    "who, status", [(None, 404), ("alice", 403), ("bob", 404), ("ana", 404), ("org", 200)],
)
def test_visibility_of_an_unpublished_submission(world, client, who, status):
    response = client.get(f"{BASE}/submissions/{world.alpha_id}", headers=world.headers(who))
    assert response.status_code == status, response.text
    assert "detail" in response.json() or status == 200


@pytest.mark.parametrize(
    "who, status", [(None, 401), ("alice", 403), ("bob", 403), ("ana", 200), ("org", 200)],
)
def test_visibility_of_published_per_case_scores(world, client, who, status):
    sid = world.baseline_ids[0]
    response = client.get(f"{BASE}/submissions/{sid}/cases", params={"organ": "liver"}, headers=world.headers(who))
    assert response.status_code == status, response.text
    if status == 200:
        # hidden cases' per-case scores: organizers only; analysts get the public sample's (none
        # scored here: the world's public-sample case has no score)
        assert response.json()["total"] == (24 if who == "org" else 0)
    # the public still sees the published aggregates
    assert client.get(f"{BASE}/submissions/{sid}").status_code == 200


def test_analyst_never_sees_hidden_per_case(world, client):
    response = client.get(f"{BASE}/submissions/{world.alpha_id}/cases", headers=world.headers("ana"))
    assert response.status_code == 404


def test_errors_are_json(world, client):
    assert client.get("/api/v1/leaderboards/nope").json() == {"detail": "no test set named 'nope'"}
    response = client.get(BASE, params={"metric": "hd95"})
    assert response.status_code == 422 and "dsc, nsd" in response.json()["detail"]
    assert client.get(f"{BASE}/subgroups/shoe_size").status_code == 422
    assert client.get(BASE, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_publish_and_unpublish_recompute_the_published_scope(world, client, session):
    from services.db.leaderboard_models import PairwiseFamily, RankingEntry

    def published_ids():
        return {e["submission_id"] for e in client.get(BASE).json()["entries"]}

    assert world.alpha_id not in published_ids()
    response = client.post(f"/api/v1/submissions/{world.alpha_id}/publish", headers=world.headers("org"))
    assert response.status_code == 200, response.text
    board = client.get(BASE, params={"organ": "kidney_right"}).json()
    assert board["entries"][0]["label"] == "AlphaSeg"  # ~0.88 beats every baseline
    assert {e["submission_id"] for e in board["entries"]} == set(world.baseline_ids) | {world.alpha_id}
    n_pairs = session.scalar(sa.select(PairwiseFamily.n_pairs).where(
        PairwiseFamily.scope == "published", PairwiseFamily.organ == "liver", PairwiseFamily.metric == "dsc"))
    assert n_pairs == 12  # 4 x 3 ordered pairs
    # the inventor now sees the published results of their own submission
    assert client.get(f"{BASE}/submissions/{world.alpha_id}", headers=world.headers("alice")).status_code == 200

    response = client.post(f"/api/v1/submissions/{world.alpha_id}/unpublish", headers=world.headers("org"))
    assert response.status_code == 200, response.text
    assert world.alpha_id not in published_ids()
    session.expire_all()
    stored = session.scalars(sa.select(RankingEntry.submission_id).where(RankingEntry.scope == "published")).all()
    assert world.alpha_id not in set(stored)
    stored_all = session.scalars(sa.select(RankingEntry.submission_id).where(RankingEntry.scope == "all")).all()
    assert world.alpha_id in set(stored_all)
