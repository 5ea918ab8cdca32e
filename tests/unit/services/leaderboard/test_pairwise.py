"""The pairwise-test cache, the packed scores and the array-built score matrices (services/leaderboard)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from evaluation.stats import ScoreMatrix, WilcoxonOptions, score_matrices_from_long
from evaluation.stats.wilcoxon import PAIR_TEST_FIELDS, pair_tests
from services.db.enums import SubmissionState
from services.db.models import Case, PairwiseCache, Score, Submission, TestSet
from services.leaderboard import compute
from services.leaderboard.pairwise import PairCache, _copy_text
from tests.factories import add_algorithm


def make_testset(session, n_submissions: int, n_cases: int = 0) -> tuple[TestSet, list[int]]:
    testset = TestSet(name="t", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                      protocol_json={}, manifest_sha256="0" * 64, root_path="/r", time_per_case_s=60,
                      memory_bytes=2**30, gpus=0, shm_bytes=2**28, pids_limit=64, shard_size=10,
                      quota_submissions=3, quota_period_days=7)
    session.add(testset)
    session.flush()
    session.add_all([Case(testset_id=testset.id, case_id=f"c{i}", image_path="/x", labels_path="/y",
                          public_sample=i == 0, extra={}) for i in range(n_cases)])
    algorithm = add_algorithm(session, team_name="team")
    subs = [Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=algorithm.team_id,
                       state=SubmissionState.scored, image_sha256=f"{k:064x}") for k in range(n_submissions)]
    session.add_all(subs)
    session.flush()
    return testset, [s.id for s in subs]


def matrix(ids: list[int], values: np.ndarray) -> ScoreMatrix:
    return ScoreMatrix("liver", "dsc", tuple(map(str, ids)), tuple(f"c{j}" for j in range(values.shape[1])), values)


def test_pair_cache_reuses_unchanged_pairs_and_retests_changed_ones(sqlite_session):
    testset, ids = make_testset(sqlite_session, 3)
    rng = np.random.default_rng(1)
    values = rng.uniform(0.5, 1, (3, 25)).round(2)
    values[2, :3] = np.nan
    options = WilcoxonOptions()

    def run(v, opts=options):
        cache = PairCache(sqlite_session, testset.id, testset.protocol_key, opts)
        tests = cache.pair_tests(matrix(ids, v))
        cache.flush()
        return cache, tests

    first, tests = run(values)
    ii, jj = np.triu_indices(3, 1)
    direct = pair_tests(matrix(ids, values), ii, jj, options)
    assert (first.computed, first.reused) == (3, 0)
    again, cached = run(values)
    assert (again.computed, again.reused) == (0, 3)
    for name in PAIR_TEST_FIELDS:  # exact through the database (NaN stored as NULL)
        assert np.array_equal(getattr(cached, name), getattr(direct, name), equal_nan=True), name
    rescored = values.copy()
    rescored[2, 10] = 0.1  # the third submission's scores change: its two pairs are re-tested
    changed, _ = run(rescored)
    assert (changed.computed, changed.reused) == (2, 1)
    other, _ = run(values, WilcoxonOptions("pratt", False, "asymptotic"))
    assert (other.computed, other.reused) == (3, 0)
    # pruning: the rows of another option set and of a submission no longer ranked go
    other.prune(ids[:2], every_scope=False)
    left = sqlite_session.execute(sa.select(PairwiseCache.submission_a_id, PairwiseCache.submission_b_id,
                                            PairwiseCache.options_key)).all()
    assert {(a, b) for a, b, _ in left} == {(ids[0], ids[1])} and len({k for *_, k in left}) == 1
    with pytest.raises(ValueError, match="ascending"):
        PairCache(sqlite_session, testset.id, testset.protocol_key, options).pair_tests(matrix(ids[::-1], values))


def test_a_flipped_direction_never_reuses_the_cached_tests(sqlite_session):
    """The cached one-sided tests are oriented by the metric's direction (review finding: the same
    values with higher_is_better=False reused p_greater of the other orientation)."""
    testset, ids = make_testset(sqlite_session, 2)
    values = np.random.default_rng(4).uniform(0.5, 1, (2, 30)).round(3)
    values[1] += 0.05
    options = WilcoxonOptions()
    higher = matrix(ids, values)
    lower = ScoreMatrix("liver", "dsc", higher.algorithms, higher.case_ids, values, higher_is_better=False)
    first = PairCache(sqlite_session, testset.id, testset.protocol_key, options)
    first.pair_tests(higher)
    first.flush()
    second = PairCache(sqlite_session, testset.id, testset.protocol_key, options)
    flipped = second.pair_tests(lower)
    assert (second.computed, second.reused) == (1, 0)
    ii, jj = np.triu_indices(2, 1)
    direct = pair_tests(lower, ii, jj, options)
    for name in PAIR_TEST_FIELDS:
        assert np.array_equal(getattr(flipped, name), getattr(direct, name), equal_nan=True), name


def test_copy_text_is_exact_and_escaped():
    assert _copy_text(np.float64(0.1) + np.float64(0.2)) == "0.30000000000000004"
    assert _copy_text(None) == "\\N" and _copy_text(True) == "t" and _copy_text(np.bool_(False)) == "f"
    assert _copy_text("a\tb\\c\nd") == "a\\tb\\\\c\\nd" and _copy_text([1, 2]) == "[1, 2]"


def long_scores(rng, algorithms, cases, organs) -> pd.DataFrame:
    rows = [{"algorithm": a, "case_pk": c, "organ": o, "dsc": float(rng.uniform()), "nsd": float(rng.uniform()),
             "failed": bool(rng.random() < 0.1)}
            for a in algorithms for c in cases for o in organs if rng.random() > 0.15]
    frame = pd.DataFrame(rows)
    frame.loc[frame.index[::7], "nsd"] = np.nan
    return frame


def test_array_built_matrices_equal_score_matrices_from_long():
    rng = np.random.default_rng(2)
    cases = pd.DataFrame({"case_pk": [5, 3, 9, 4], "case_id": ["d", "b", "e", "c"]})
    organs = ["liver", "spleen", "zz_extra"]  # one organ outside ORGANS: sorted after them
    scores = long_scores(rng, ["7", "2", "5"], cases["case_pk"].tolist(), organs)
    built = compute._frame_matrices(scores, cases, ["2", "5", "7", "11"])
    case_of = dict(zip(cases["case_pk"], cases["case_id"]))
    reference = score_matrices_from_long(scores.assign(case_id=scores["case_pk"].map(case_of)).drop(columns="case_pk"),
                                         metrics=["dsc", "nsd"], algorithms=["2", "5", "7", "11"],
                                         case_metadata=cases[["case_id"]])
    assert list(built) == list(reference) and list(built)[-1][0] == "zz_extra"
    for key in reference:
        assert built[key].case_ids == reference[key].case_ids and built[key].algorithms == reference[key].algorithms
        assert np.array_equal(built[key].values, reference[key].values, equal_nan=True), key
        assert np.array_equal(built[key].failed, reference[key].failed), key
    with pytest.raises(ValueError, match="not cases of the test set"):
        compute._frame_matrices(scores.assign(case_pk=scores["case_pk"] + 100), cases, ["2"])


def test_packed_scores_return_what_the_scores_hold(sqlite_session):
    testset, ids = make_testset(sqlite_session, 2, n_cases=6)
    case_pks = list(sqlite_session.scalars(sa.select(Case.id).order_by(Case.id)))
    rows = [{"submission_id": s, "case_id": c, "organ": o, "protocol_key": "touchstone@1",
             "dsc": None if (s + c) % 5 == 0 else 0.25 * ((s + c) % 4), "nsd": 0.5,
             "status": "ok" if c % 3 else "unreadable"} for s in ids for c in case_pks for o in ("liver", "aorta")]
    sqlite_session.execute(sa.insert(Score), rows)
    read, organs = compute.score_records(sqlite_session, ids, "touchstone@1")
    assert read.size == 2 * 5 * 2  # the public-sample case is left out
    first, first_organs = compute.packed_records(sqlite_session, ids, "touchstone@1")
    packed, packed_organs = compute.packed_records(sqlite_session, ids, "touchstone@1")  # from the blobs
    for got, got_organs in ((first, first_organs), (packed, packed_organs)):
        key = np.argsort(got[["submission", "case", "organ"]], order=["submission", "case", "organ"])
        want = np.argsort(read[["submission", "case", "organ"]], order=["submission", "case", "organ"])
        assert got_organs == organs == ["aorta", "liver"]  # evaluation.labels.ORGANS order
        for name in compute.RECORD_DTYPE.names:
            assert np.array_equal(got[name][key], read[name][want], equal_nan=True), name
    assert read["failed"].sum() == 2 * 2 * sum(1 for c in case_pks[1:] if c % 3 == 0)
    cells = compute.expected_from_records(read, organs)
    assert cells == compute.load_expected(sqlite_session, testset) - {(case_pks[0], o) for o in ("liver", "aorta")}
