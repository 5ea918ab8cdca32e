"""Recompute and store the leaderboard statistics of a test set (the write side).

Entry point: :func:`on_submission_scored` -- the ``finalize`` task calls it when a submission is
scored, and the API calls it when an organizer publishes or unpublishes one. It

1. replaces the submission's :class:`~services.db.models.Aggregate` rows (per organ and the organ
   average, per metric: ``overall`` and one row per group of ``hospital`` and of every subgroup
   variable: n, mean, median, std, percentile bootstrap CIs of mean and median, n_failed, n_missing);
2. recomputes, for both scopes (``all``: scored + published submissions; ``published``), the
   comparative statistics of the test set: rankings by every method, all pairwise one-sided
   Wilcoxon tests with Holm adjustment, and bootstrap rank stability -- each per organ (and the
   average) and metric, keyed by the test set's protocol version.

The statistics themselves are :mod:`evaluation.stats` (pure functions); this module only loads the
scores, builds the score matrices, and writes the results. The caller commits (``flush`` only).

Conventions:

* a submission is an "algorithm" of the score matrix (its id as the label): two submissions of one
  algorithm are ranked separately;
* the case axis is every case of the test set, so a case without a score counts as missing
  (``NaN``), never silently dropped;
* a score whose ``status`` names a failure (:func:`is_failure`) keeps its stored (worst) value
  and is counted in ``n_failed``;
* the organ ``average`` is the per-case mean over the organs scored for that case
  (:func:`evaluation.stats.average_over_organs`), then summarised like an organ.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation.labels import ORGANS
from evaluation.stats import (
    AVERAGE_ORGAN,
    SUBGROUP_VARIABLES,
    ScoreMatrix,
    WilcoxonOptions,
    average_over_organs,
    bootstrap_rank_stability,
    pairwise_wilcoxon,
    rank,
    score_matrices_from_long,
)
from evaluation.stats.subgroups import UNKNOWN_GROUP, group_labels
from evaluation.stats.summary import bootstrap_distribution, percentile_interval
from services.db.base import finite_or_none, utcnow
from services.db.enums import SubmissionState
from services.db.leaderboard_models import SCOPES, PairwiseTest, RankingEntry, RankStability, StatsRun
from services.db.models import Aggregate, Case, Score, Submission, TestSet

log = logging.getLogger("touchstone.leaderboard")

#: the metrics the leaderboard ranks by (both higher-is-better, in [0, 1])
METRICS: tuple[str, ...] = ("dsc", "nsd")
#: ranking methods stored (names as the CLI's --method): aggregate-then-rank by mean or median,
#: rank-then-aggregate, test-then-rank
RANKING_METHODS: tuple[str, ...] = ("mean", "median", "rank-mean", "test")
#: ranking methods whose bootstrap rank stability is stored (the median bootstrap is O(B N K log N))
STABILITY_METHODS: tuple[str, ...] = ("mean", "rank-mean")
#: the breakdowns of the per-submission aggregates (Aggregate.scope), hospital first
BREAKDOWNS: tuple[str, ...] = SUBGROUP_VARIABLES
#: metadata columns of a case (age_decade is derived from age)
CASE_METADATA = ("hospital", "age", "sex", "race", "manufacturer", "scanner", "contrast_phase", "diagnosis")
#: score statuses that are a failed prediction scored with the worst value
FAILURE_PREFIXES = ("missing", "invalid", "timeout", "error", "failed", "crash")
#: which submission states each scope holds
SCOPE_STATES: dict[str, tuple[SubmissionState, ...]] = {
    "published": (SubmissionState.published,),
    "all": (SubmissionState.scored, SubmissionState.published),
}
ORGANS_AND_AVERAGE: tuple[str, ...] = (AVERAGE_ORGAN, *ORGANS)


def is_failure(status: str | None) -> bool:
    """Whether a score status marks a failed prediction (``missing_prediction``, ``timeout``...)."""
    return bool(status) and str(status).lower().startswith(FAILURE_PREFIXES)


@dataclass(frozen=True)
class StatsOptions:
    """Settings of every stored statistic (recorded in ``StatsRun.details``).

    n_resamples / seed / confidence: both bootstraps (CIs of the aggregates, rank stability);
    group_resamples: bootstrap resamples of each hospital / subgroup CI; correction / alpha: the
    multiple-testing correction over all K(K-1) ordered pairs and the significance level;
    wilcoxon: the signed-rank options (default: R's ``wilcox.test(paired=TRUE, exact=FALSE,
    correct=TRUE)``).
    """

    n_resamples: int = 1000
    group_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    correction: str = "holm"
    alpha: float = 0.05
    wilcoxon: WilcoxonOptions = field(default_factory=WilcoxonOptions)

    def method_name(self) -> str:
        w = self.wilcoxon
        return (
            f"wilcoxon signed-rank, paired, one-sided (zero_method={w.zero_method}, "
            f"continuity={w.correction}); {self.correction} over all ordered pairs"
        )


DEFAULT_OPTIONS = StatsOptions()


@dataclass
class RecomputeReport:
    """What a recomputation wrote (for logs and the CLI)."""

    testset: str
    protocol_key: str
    aggregates: int = 0
    rankings: int = 0
    pairwise: int = 0
    stability: int = 0
    submissions: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_cases(session: Session, testset_id: int) -> pd.DataFrame:
    """The test set's hidden cases: ``case_pk`` (cases.id), ``case_id`` and the metadata columns.

    Public-sample cases are left out: they are the inventors' validation run, not the benchmark,
    and counting them would make every submission "miss" them."""
    columns = [Case.id, Case.case_id, *(getattr(Case, c) for c in CASE_METADATA)]
    rows = session.execute(
        sa.select(*columns).where(Case.testset_id == testset_id, Case.public_sample.is_(False)).order_by(Case.id)
    ).all()
    return pd.DataFrame(rows, columns=["case_pk", "case_id", *CASE_METADATA])


def load_scores(session: Session, submission_ids: Sequence[int], protocol_key: str) -> pd.DataFrame:
    """Long score table of the submissions under ``protocol_key`` on hidden cases (as
    :func:`load_cases`): algorithm (submission id as str), case_pk, organ, dsc, nsd, failed."""
    columns = ["algorithm", "case_pk", "organ", *METRICS, "failed"]
    if not submission_ids:
        return pd.DataFrame(columns=columns)
    stmt = sa.select(
        Score.submission_id, Score.case_id, Score.organ, *(getattr(Score, m) for m in METRICS), Score.status
    ).join(Case, Case.id == Score.case_id).where(
        Score.submission_id.in_(list(submission_ids)), Score.protocol_key == protocol_key, Case.public_sample.is_(False)
    )
    frame = pd.DataFrame(session.execute(stmt).all(), columns=["algorithm", "case_pk", "organ", *METRICS, "status"])
    frame["algorithm"] = frame["algorithm"].astype(str)
    frame["failed"] = frame["status"].map(is_failure).astype(bool)
    for metric in METRICS:
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype(np.float64)
    return frame[columns]


def build_matrices(
    scores: pd.DataFrame, cases: pd.DataFrame, algorithms: Sequence[str]
) -> dict[tuple[str, str], ScoreMatrix]:
    """``{(organ, metric): ScoreMatrix}`` over every case of the test set, organs plus ``average``.

    Organs nobody scored are absent; the average is over the organs present.
    """
    if scores.empty or not len(algorithms):
        return {}
    case_of = dict(zip(cases["case_pk"], cases["case_id"].astype(str)))
    long = scores.assign(case_id=scores["case_pk"].map(case_of)).drop(columns=["case_pk"])
    matrices = score_matrices_from_long(
        long,
        metrics=list(METRICS),
        algorithms=list(algorithms),
        case_metadata=cases[["case_id"]].astype(str),
    )
    for metric in METRICS:
        per_organ = [m for (organ, mm), m in matrices.items() if mm == metric and organ != AVERAGE_ORGAN]
        if per_organ:
            matrices[(AVERAGE_ORGAN, metric)] = average_over_organs(per_organ)
    return matrices


def scope_submission_ids(session: Session, testset_id: int, scope: str) -> list[int]:
    """Ids of the test set's submissions in ``scope`` (ascending)."""
    if scope not in SCOPE_STATES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    return list(
        session.scalars(
            sa.select(Submission.id)
            .where(Submission.testset_id == testset_id, Submission.state.in_(SCOPE_STATES[scope]))
            .order_by(Submission.id)
        )
    )


# --------------------------------------------------------------------------------------------
# per-submission aggregates
# --------------------------------------------------------------------------------------------


def summary_row(values: np.ndarray, failed: np.ndarray, *, n_resamples: int, seed: int,
                confidence: float) -> dict:
    """Summary of one algorithm's scores over a set of cases (``NaN`` = not scored).

    The same numbers as :func:`evaluation.stats.summarize` on a one-algorithm matrix (same seeding:
    the first generator spawned from ``SeedSequence(seed)``; same resample indices for mean and
    median) without building a DataFrame per call: n (scored), mean, median, std (ddof 1),
    percentile bootstrap intervals of mean and median, n_failed, n_missing.
    """
    x = values[~np.isnan(values)]
    n = int(x.size)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    indices = rng.integers(0, max(n, 1), (n_resamples, n))
    # percentile intervals only (what is stored): bootstrap_intervals' BCa half (jackknife,
    # acceleration) was ~15 % of an aggregate recomputation and never read
    nan = (float("nan"), float("nan"))
    mean_lo, mean_hi = percentile_interval(bootstrap_distribution(x, "mean", indices), confidence) if n else nan
    median_lo, median_hi = (
        percentile_interval(bootstrap_distribution(x, "median", indices), confidence) if n else nan
    )
    return {
        "n": n,
        "mean": finite_or_none(x.mean()) if n else None,
        "median": finite_or_none(np.median(x)) if n else None,
        "std": finite_or_none(x.std(ddof=1)) if n > 1 else None,
        "ci_low": finite_or_none(mean_lo),
        "ci_high": finite_or_none(mean_hi),
        "median_ci_low": finite_or_none(median_lo),
        "median_ci_high": finite_or_none(median_hi),
        "n_failed": int(failed.sum()),
        "n_missing": int(values.size - n),
    }


def submission_aggregate_rows(
    matrices: dict[tuple[str, str], ScoreMatrix], cases: pd.DataFrame, options: StatsOptions = DEFAULT_OPTIONS
) -> list[dict]:
    """Aggregate rows (dicts: organ, metric, scope, group_value + the statistics) of the one
    algorithm of ``matrices``: ``overall`` over every case, then per group of each breakdown
    variable that any case has a value of (cases without a value form the group ``unknown``,
    groups are never dropped, however small)."""
    rows: list[dict] = []
    if not matrices:
        return rows
    metadata = cases.assign(case_id=cases["case_id"].astype(str))
    case_ids = next(iter(matrices.values())).case_ids
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for variable in BREAKDOWNS:
        labels = group_labels(metadata, variable, case_ids)
        if (labels == UNKNOWN_GROUP).all():
            continue  # no case has this metadata: no breakdown to show
        groups[variable] = [(g, labels == g) for g in sorted(set(labels))]
    for (organ, metric), matrix in matrices.items():
        if matrix.n_algorithms != 1 or matrix.case_ids != case_ids:
            raise ValueError("submission_aggregate_rows needs one-algorithm matrices over the same cases")
        values, failed = matrix.values[0], matrix.failed[0]
        rows.append({"organ": organ, "metric": metric, "scope": "overall", "group_value": "",
                     **summary_row(values, failed, n_resamples=options.n_resamples, seed=options.seed,
                                   confidence=options.confidence)})
        for variable, masks in groups.items():
            for group, mask in masks:
                rows.append({"organ": organ, "metric": metric, "scope": variable, "group_value": group,
                             **summary_row(values[mask], failed[mask], n_resamples=options.group_resamples,
                                           seed=options.seed, confidence=options.confidence)})
    return rows


def store_submission_aggregates(
    session: Session,
    submission: Submission,
    testset: TestSet,
    cases: pd.DataFrame | None = None,
    options: StatsOptions = DEFAULT_OPTIONS,
) -> int:
    """Replace the submission's aggregates under the test set's protocol key; returns rows written."""
    protocol_key = testset.protocol_key
    cases = load_cases(session, testset.id) if cases is None else cases
    algorithm = str(submission.id)
    scores = load_scores(session, [submission.id], protocol_key)
    matrices = build_matrices(scores, cases, [algorithm])
    rows = submission_aggregate_rows(matrices, cases, options)
    session.execute(
        sa.delete(Aggregate).where(Aggregate.submission_id == submission.id, Aggregate.protocol_key == protocol_key)
    )
    now = utcnow()
    if rows:
        session.execute(
            sa.insert(Aggregate),
            [{"submission_id": submission.id, "protocol_key": protocol_key, "computed_at": now, **r} for r in rows],
        )
    return len(rows)


# --------------------------------------------------------------------------------------------
# comparative statistics of a test set
# --------------------------------------------------------------------------------------------


@contextmanager
def _frozen_gc() -> Iterator[None]:
    """statsmodels' Holm adjustment calls ``gc.collect()`` on every call, which scans every object
    of a long-lived process (0.3 s each in the API); freezing the objects that exist already makes
    those collections scan only the new ones."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def comparative_rows(
    matrices: dict[tuple[str, str], ScoreMatrix], options: StatsOptions = DEFAULT_OPTIONS
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(runs, rankings, pairwise, stability) rows -- dicts keyed by the table columns minus
    (testset_id, protocol_key, scope) -- for every (organ, metric) matrix."""
    with _frozen_gc():
        return _comparative_rows(matrices, options)


def _comparative_rows(
    matrices: dict[tuple[str, str], ScoreMatrix], options: StatsOptions
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    runs, rankings, pairwise_rows, stability_rows = [], [], [], []
    method_name = options.method_name()
    for (organ, metric), matrix in matrices.items():
        key = {"organ": organ, "metric": metric}
        pairwise = pairwise_wilcoxon(matrix, options=options.wilcoxon, correction=options.correction,
                                     alpha=options.alpha)
        for row in pairwise.itertuples(index=False):
            pairwise_rows.append({
                **key,
                "submission_a_id": int(row.algorithm),
                "submission_b_id": int(row.opponent),
                "n_common": int(row.n_common),
                "statistic": finite_or_none(row.statistic),
                "p_value": finite_or_none(row.p_value),
                "p_adjusted": finite_or_none(row.p_adjusted),
                "significant": bool(row.significant),
                "mean_difference": finite_or_none(row.mean_difference),
                "method": method_name,
            })
        for method in RANKING_METHODS:
            table = rank(matrix, method, pairwise=pairwise, alpha=options.alpha, correction=options.correction,
                         options=options.wilcoxon)
            for row in table.itertuples(index=False):
                rankings.append({**key, "method": method, "submission_id": int(row.algorithm),
                                 "value": finite_or_none(row.value), "rank": int(row.rank)})
        tau: dict[str, dict] = {}
        if matrix.n_cases and matrix.n_algorithms:
            for method in STABILITY_METHODS:
                stab = bootstrap_rank_stability(matrix, method, n_resamples=options.n_resamples, seed=options.seed,
                                                confidence=options.confidence)
                tau[method] = {k: finite_or_none(v) for k, v in stab.tau_summary().items()}
                for row in stab.to_frame().itertuples(index=False):
                    stability_rows.append({
                        **key,
                        "method": method,
                        "submission_id": int(row.algorithm),
                        "full_rank": int(row.full_rank),
                        "mean_rank": float(row.mean_rank),
                        "median_rank": float(row.median_rank),
                        "rank_ci_low": float(row.rank_ci_low),
                        "rank_ci_high": float(row.rank_ci_high),
                        "p_best": float(row.p_best),
                        "rank_counts": [int(c) for c in row.rank_counts],
                        "n_resamples": options.n_resamples,
                    })
        details = {
            "options": {k: v for k, v in asdict(options).items() if k != "wilcoxon"},
            "wilcoxon": asdict(options.wilcoxon),
            "pairwise_method": method_name,
            "kendall_tau": tau,
        }
        runs.append({**key, "n_submissions": matrix.n_algorithms, "n_cases": matrix.n_cases, "details": details})
    return runs, rankings, pairwise_rows, stability_rows


def store_comparative(
    session: Session,
    testset: TestSet,
    scope: str,
    cases: pd.DataFrame | None = None,
    options: StatsOptions = DEFAULT_OPTIONS,
    cache: dict | None = None,
) -> tuple[int, int, int, int]:
    """Replace the (test set, protocol, scope) rows of the comparative tables; returns row counts
    (runs, rankings, pairwise, stability). ``cache`` (a dict kept across scopes) reuses the rows
    when two scopes hold the same submissions (the common case: everything scored is published)."""
    protocol_key = testset.protocol_key
    cases = load_cases(session, testset.id) if cases is None else cases
    ids = scope_submission_ids(session, testset.id, scope)
    cache = {} if cache is None else cache
    if tuple(ids) not in cache:
        scores = load_scores(session, ids, protocol_key)
        # submissions without a single score under this protocol are not ranked
        present = set(scores["algorithm"])
        algorithms = [str(i) for i in ids if str(i) in present]
        cache[tuple(ids)] = comparative_rows(build_matrices(scores, cases, algorithms), options)
    runs, rankings, pairwise, stability = cache[tuple(ids)]
    now = utcnow()
    for model, rows in ((StatsRun, runs), (RankingEntry, rankings), (PairwiseTest, pairwise), (RankStability, stability)):
        session.execute(
            sa.delete(model).where(
                model.testset_id == testset.id, model.protocol_key == protocol_key, model.scope == scope
            )
        )
        if rows:
            extra = {"testset_id": testset.id, "protocol_key": protocol_key, "scope": scope}
            if model is StatsRun:
                extra["computed_at"] = now
            session.execute(sa.insert(model), [{**r, **extra} for r in rows])
    return len(runs), len(rankings), len(pairwise), len(stability)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def _lock_testset(session: Session, testset_id: int) -> TestSet:
    """Serialise recomputations of one test set: a row lock on PostgreSQL; SQLite's writer lock
    is taken by the first write below."""
    testset = session.execute(
        sa.select(TestSet).where(TestSet.id == testset_id).with_for_update()
    ).scalar_one()
    return testset


def recompute_testset(
    session: Session,
    testset: TestSet,
    *,
    submission_ids: Iterable[int] = (),
    scopes: Sequence[str] = SCOPES,
    options: StatsOptions = DEFAULT_OPTIONS,
) -> RecomputeReport:
    """Recompute the aggregates of ``submission_ids`` and the comparative statistics of ``scopes``."""
    testset = _lock_testset(session, testset.id)
    cases = load_cases(session, testset.id)
    report = RecomputeReport(testset=testset.name, protocol_key=testset.protocol_key)
    for submission_id in submission_ids:
        submission = session.get(Submission, submission_id)
        if submission is None or submission.testset_id != testset.id:
            raise LookupError(f"submission {submission_id} is not a submission of test set {testset.name!r}")
        report.aggregates += store_submission_aggregates(session, submission, testset, cases, options)
    cache: dict = {}
    for scope in scopes:
        _, n_rank, n_pair, n_stab = store_comparative(session, testset, scope, cases, options, cache)
        report.rankings += n_rank
        report.pairwise += n_pair
        report.stability += n_stab
        report.submissions[scope] = len(scope_submission_ids(session, testset.id, scope))
    session.flush()
    log.info("leaderboard of %s (%s) recomputed: %s", testset.name, testset.protocol_key, report)
    return report


def on_submission_scored(
    session: Session, submission_id: int, options: StatsOptions = DEFAULT_OPTIONS
) -> RecomputeReport:
    """Recompute and store everything the leaderboard shows after ``submission_id`` was scored,
    published or unpublished: its aggregates (when it has scores, i.e. it is scored or published)
    and the rankings, pairwise tests and rank stability of its test set in both scopes.

    Idempotent; the caller commits. Raises :class:`LookupError` for an unknown submission.
    """
    submission = session.get(Submission, submission_id)
    if submission is None:
        raise LookupError(f"no submission {submission_id}")
    with_scores = submission.state in (SubmissionState.scored, SubmissionState.published)
    return recompute_testset(
        session, submission.testset, submission_ids=[submission_id] if with_scores else [], options=options
    )
