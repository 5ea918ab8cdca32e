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
* the organ ``average`` follows the protocol's ``organ_average`` rule (``all-organs``: a case
  counts only when every organ present in its ground truth is scored, Touchstone's leaderboard;
  ``scored-organs``: the mean over the organs scored), then summarised like an organ;
* one missing-case policy per test set (``TestSet.missing_policy``) decides every number:
  ``worst`` -- a missing case (an organ of a case that some submission scored, without a score
  of this submission) takes the protocol's worst value everywhere; ``common`` -- rankings,
  P(best) and the bootstrap use the cases every ranked submission has, each pairwise test the
  cases its two submissions share, the per-submission aggregates each submission's own cases;
* the statistical options (``TestSet.stats_options``: a preset and/or individual options, see
  :data:`STATS_PRESETS`) and the tie rule are recorded in every ``StatsRun.details``.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session
from threadpoolctl import threadpool_limits

from evaluation.io import ScoreStatus
from evaluation.labels import ORGANS
from evaluation.manifest import METADATA_FIELDS
from evaluation.metric_registry import LESION_METRICS
from evaluation.stats import (
    AVERAGE_ORGAN,
    CORRECTIONS,
    FAMILIES,
    MISSING_POLICIES,
    ORGAN_AVERAGE_RULES,
    SUBGROUP_VARIABLES,
    TIE_RULE,
    ScoreMatrix,
    WilcoxonOptions,
    apply_missing_policy,
    average_over_organs,
    bootstrap_rank_stability,
    higher_is_better,
    rank,
)
from evaluation.stats.ranking import resample_counts
from evaluation.stats.subgroups import UNKNOWN_GROUP, group_labels
from evaluation.stats.wilcoxon import pairwise_table
from evaluation.stats.summary import ResampleCache, summary_records
from services.db.base import finite_or_none, utcnow
from services.db.enums import SubmissionState
from services.db.leaderboard_models import SCOPES, PairwiseFamily, RankingEntry, RankStability, StatsRun
from services.db.models import Aggregate, Case, PackedScores, Score, Submission, TestSet
from services.leaderboard.pairwise import FreshPairs, PairCache, bulk_insert, pack_family
from services.leaderboard import versions
from services.leaderboard.suppression import withheld_groups

log = logging.getLogger("touchstone.leaderboard")

#: threads computing a submission's aggregates and a scope's comparative statistics (one organ x
#: metric each): the machine's cores, at most 4
STATS_THREADS = max(1, min(4, os.cpu_count() or 1))

#: the metrics the leaderboard ranks by under an organ protocol (both higher-is-better, in [0, 1]);
#: every metric a protocol can compute is evaluation.metric_registry.METRICS
BOARD_METRICS: tuple[str, ...] = ("dsc", "nsd")
#: ... and under a ``kind: lesion`` protocol: also the lesion metrics (directions from the registry)
LESION_BOARD_METRICS: tuple[str, ...] = BOARD_METRICS + LESION_METRICS
#: ranking methods stored (names as the CLI's --method): aggregate-then-rank by mean or median,
#: rank-then-aggregate, test-then-rank
RANKING_METHODS: tuple[str, ...] = ("mean", "median", "rank-mean", "test")
#: ranking methods whose bootstrap rank stability is stored (the median bootstrap is O(B N K log N))
STABILITY_METHODS: tuple[str, ...] = ("mean", "rank-mean")
#: the breakdowns of the per-submission aggregates (Aggregate.scope), hospital first
BREAKDOWNS: tuple[str, ...] = SUBGROUP_VARIABLES
#: which submission states each scope holds
SCOPE_STATES: dict[str, tuple[SubmissionState, ...]] = {
    "published": (SubmissionState.published,),
    "all": (SubmissionState.scored, SubmissionState.published),
}
ORGANS_AND_AVERAGE: tuple[str, ...] = (AVERAGE_ORGAN, *ORGANS)


def is_failure(status: str | None) -> bool:
    """Whether a stored score status marks a failed prediction scored with the worst value:
    :attr:`evaluation.io.ScoreStatus.is_failure` (every status but ``ok``: ``missing_prediction``,
    ``unreadable``, ``too_large``, ``geometry_mismatch``, ``invalid_labels``,
    ``invalid_prediction``); no status is not, a value outside the enum is."""
    return ScoreStatus.status_is_failure(status)


CI_METHODS = ("percentile", "bca")
WORST_DEFAULT: dict[str, float] = {"dsc": 0.0, "nsd": 0.0}

#: named sets of statistical options (``touchstone testsets update NAME --stats-preset P``)
STATS_PRESETS: dict[str, dict[str, Any]] = {
    # Touchstone's plot/SignificanceMaps.py: per organ and ordered pair
    # scipy.stats.wilcoxon(x, y, alternative='greater') with scipy's defaults on the cases both
    # models have, then statsmodels multipletests(method='holm') over all ordered pairs
    "touchstone-2024": {"zero_method": "wilcox", "continuity": False, "test_method": "auto",
                        "correction": "holm", "family": "all", "test_correction": "holm",
                        "ci_method": "percentile"},
    # challengeR: wilcox.test(paired=TRUE, exact=FALSE, correct=TRUE); testThenRank uncorrected
    "challenger": {"zero_method": "wilcox", "continuity": True, "test_method": "asymptotic",
                   "correction": "holm", "family": "tested", "test_correction": "none",
                   "ci_method": "percentile"},
}
#: the individual options (keys of ``TestSet.stats_options``) and their allowed values
STATS_OPTION_VALUES: dict[str, tuple] = {
    "zero_method": ("wilcox", "pratt", "zsplit"),
    "continuity": (True, False),
    "test_method": ("asymptotic", "exact", "auto"),
    "correction": CORRECTIONS,
    "test_correction": CORRECTIONS,
    "family": FAMILIES,
    "ci_method": CI_METHODS,
}


def normalize_stats_options(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Check a ``stats_options`` dict (``preset`` plus individual options, which win over the
    preset) and return it with only known keys; raises :class:`ValueError` naming the bad key."""
    raw = dict(raw or {})
    out: dict[str, Any] = {}
    preset = raw.pop("preset", None)
    if preset is not None:
        if preset not in STATS_PRESETS:
            raise ValueError(f"unknown stats preset {preset!r}; choose one of {sorted(STATS_PRESETS)}")
        out["preset"] = preset
    for key, value in raw.items():
        if key not in STATS_OPTION_VALUES:
            raise ValueError(f"unknown statistics option {key!r}; options: preset, {', '.join(STATS_OPTION_VALUES)}")
        allowed = STATS_OPTION_VALUES[key]
        if value not in allowed:
            raise ValueError(f"statistics option {key}={value!r} is not one of {list(allowed)}")
        out[key] = value
    return out


@dataclass(frozen=True)
class StatsOptions:
    """Settings of every stored statistic (recorded in ``StatsRun.details``).

    n_resamples / seed / confidence: both bootstraps (CIs of the aggregates, rank stability);
    group_resamples: bootstrap resamples of each hospital / subgroup CI; correction / alpha: the
    multiple-testing correction of the pairwise tests and the significance level; family: which
    ordered pairs count in that correction (``tested`` or ``all``); test_correction: the
    correction of test-then-rank; wilcoxon: the signed-rank options (default: R's
    ``wilcox.test(paired=TRUE, exact=FALSE, correct=TRUE)``); missing_policy: ``worst`` or
    ``common``; ci_method: the interval stored (``percentile`` or ``bca``); organ_average: the
    protocol's organ-average rule; worst: the protocol's worst value per metric; min_group_size:
    the test set's ``too_small`` threshold; preset: the preset the options came from, if any.
    """

    n_resamples: int = 1000
    group_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    correction: str = "holm"
    alpha: float = 0.05
    wilcoxon: WilcoxonOptions = field(default_factory=WilcoxonOptions)
    missing_policy: str = "worst"
    family: str = "tested"
    test_correction: str = "holm"
    ci_method: str = "percentile"
    organ_average: str = "scored-organs"
    worst: dict[str, float] = field(default_factory=lambda: dict(WORST_DEFAULT))
    min_group_size: int = 10
    preset: str | None = None
    #: the metrics ranked (:func:`board_metrics`) and the protocol's lesion classes (left out of
    #: the DSC/NSD organ average; the lesion metrics' average is over them)
    metrics: tuple[str, ...] = BOARD_METRICS
    lesion_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.missing_policy not in MISSING_POLICIES:
            raise ValueError(f"missing_policy must be one of {list(MISSING_POLICIES)}, got {self.missing_policy!r}")
        if self.ci_method not in CI_METHODS:
            raise ValueError(f"ci_method must be one of {list(CI_METHODS)}, got {self.ci_method!r}")
        if self.organ_average not in ORGAN_AVERAGE_RULES:
            raise ValueError(f"organ_average must be one of {list(ORGAN_AVERAGE_RULES)}, got {self.organ_average!r}")
        for c in (self.correction, self.test_correction):
            if c not in CORRECTIONS:
                raise ValueError(f"unknown correction {c!r}; choose one of {list(CORRECTIONS)}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")

    def method_name(self) -> str:
        w = self.wilcoxon
        family = "all ordered pairs" if self.family == "all" else "all ordered pairs with a test"
        return (
            f"wilcoxon signed-rank, paired, one-sided (zero_method={w.zero_method}, "
            f"continuity={w.correction}, method={w.method}); {self.correction} over {family}"
        )

    def describe(self) -> dict[str, Any]:
        """What produced the numbers (stored in every run's details, printed under every table)."""
        w = self.wilcoxon
        return {
            "preset": self.preset,
            "missing_policy": self.missing_policy,
            "tie_rule": TIE_RULE,
            "organ_average": self.organ_average,
            "wilcoxon": {"zero_method": w.zero_method, "continuity": w.correction, "method": w.method},
            "correction": self.correction,
            "family": self.family,
            "test_correction": self.test_correction,
            "ci_method": self.ci_method,
            "confidence": self.confidence,
            "min_group_size": self.min_group_size,
        }

    def footer(self) -> str:
        """One line naming the missing-case policy, the tie rule and the test options."""
        w = self.wilcoxon
        preset = f"preset {self.preset}; " if self.preset else ""
        return (
            f"{preset}missing cases: {self.missing_policy}; organ average: {self.organ_average}; {TIE_RULE}; "
            f"Wilcoxon {w.method} (zero_method={w.zero_method}, continuity={w.correction}), "
            f"{self.correction} over {'all' if self.family == 'all' else 'tested'} ordered pairs; "
            f"test-then-rank {self.test_correction}; {self.ci_method} {self.confidence:g} CIs"
        )


def _protocol_data(testset: TestSet) -> dict[str, Any]:
    """The test set's protocol as data: its stored JSON, else the preset of the same name and
    version (as dict), else {}."""
    data = dict(testset.protocol_json or {})
    if data:
        return data
    from evaluation.protocols import PRESETS

    preset = PRESETS.get(testset.protocol_name)
    if preset is not None and str(preset.version) == str(testset.protocol_version):
        return {"kind": preset.kind, "lesions": dict(preset.lesions)}
    return {}


def lesion_classes(testset: TestSet) -> tuple[str, ...]:
    """The lesion classes of the test set's protocol (``()`` for an organ protocol)."""
    data = _protocol_data(testset)
    return tuple(data.get("lesions") or ()) if data.get("kind") == "lesion" else ()


def board_metrics(testset: TestSet | None) -> tuple[str, ...]:
    """The metrics the leaderboard offers for ``testset``: :data:`BOARD_METRICS` (DSC, NSD), and under a
    ``kind: lesion`` protocol also the lesion metrics (:data:`LESION_BOARD_METRICS`)."""
    return LESION_BOARD_METRICS if testset is not None and lesion_classes(testset) else BOARD_METRICS


def protocol_settings(testset: TestSet) -> tuple[str, dict[str, float]]:
    """(organ-average rule, worst value per metric) of the test set's protocol (its stored JSON,
    else the preset of the same name and version)."""
    data = dict(testset.protocol_json or {})
    rule, worst = data.get("organ_average"), data.get("worst")
    if rule is None or worst is None:
        from evaluation.protocols import PRESETS

        preset = PRESETS.get(testset.protocol_name)
        if preset is not None and str(preset.version) == str(testset.protocol_version):
            rule = rule or preset.organ_average
            worst = worst or dict(preset.worst)
    metrics = board_metrics(testset)
    worst = {m: float(v) for m, v in (worst or WORST_DEFAULT).items() if m in metrics}
    return rule or "scored-organs", {**WORST_DEFAULT, **worst}


def options_for_testset(testset: TestSet, base: StatsOptions | None = None) -> StatsOptions:
    """The options of ``testset``: resampling knobs from ``base`` (default :data:`DEFAULT_OPTIONS`),
    policy, test options, CI method, organ average, worst values and ``min_group_size`` from the
    test set and its protocol (so no caller can silently use another rule)."""
    base = base or DEFAULT_OPTIONS
    chosen = normalize_stats_options(testset.stats_options)
    merged = {**STATS_PRESETS.get(chosen.get("preset") or "", {}), **chosen}
    rule, worst = protocol_settings(testset)
    return StatsOptions(
        n_resamples=base.n_resamples, group_resamples=base.group_resamples, seed=base.seed,
        confidence=base.confidence, alpha=base.alpha,
        correction=merged.get("correction", "holm"),
        wilcoxon=WilcoxonOptions(zero_method=merged.get("zero_method", "wilcox"),
                                 correction=bool(merged.get("continuity", True)),
                                 method=merged.get("test_method", "asymptotic")),
        missing_policy=testset.missing_policy or "worst",
        family=merged.get("family", "tested"),
        test_correction=merged.get("test_correction", "holm"),
        ci_method=merged.get("ci_method", "percentile"),
        organ_average=rule, worst=worst,
        min_group_size=int(testset.min_group_size or 1),
        preset=chosen.get("preset"),
        metrics=board_metrics(testset), lesion_classes=lesion_classes(testset),
    )


def breakdown_variables(testset: TestSet | None) -> tuple[str, ...]:
    """The breakdowns of a test set: ``hospital`` then its ``subgroup_variables`` (``age`` means
    ``age_decade``), or the default :data:`BREAKDOWNS` when it names none."""
    chosen = list(getattr(testset, "subgroup_variables", None) or [])
    if not chosen:
        return BREAKDOWNS
    out = ["hospital"]
    for v in chosen:
        v = "age_decade" if v == "age" else str(v)
        if v not in out:
            out.append(v)
    return tuple(out)


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
    #: unordered pairs x organ x metric tested in this recomputation, and taken from the cache
    pairs_tested: int = 0
    pairs_reused: int = 0
    #: wall seconds per stage: scores (read), aggregates, comparative (tests, rankings, bootstrap,
    #: writes), cache (pairwise cache written and pruned)
    seconds: dict[str, float] = field(default_factory=dict)
    #: scopes whose inputs did not change (their rows were left as they are)
    unchanged: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_cases(session: Session, testset_id: int, extra_columns: Sequence[str] = ()) -> pd.DataFrame:
    """The test set's hidden cases: ``case_pk`` (cases.id), ``case_id``, the metadata columns and
    the requested ``extra_columns`` (kept metadata of ``Case.extra``, e.g. ``kvp``).

    Public-sample cases are left out: they are the inventors' validation run, not the benchmark,
    and counting them would make every submission "miss" them."""
    columns = [Case.id, Case.case_id, *(getattr(Case, c) for c in METADATA_FIELDS), Case.extra]
    rows = session.execute(
        sa.select(*columns).where(Case.testset_id == testset_id, Case.public_sample.is_(False)).order_by(Case.id)
    ).all()
    frame = pd.DataFrame(rows, columns=["case_pk", "case_id", *METADATA_FIELDS, "extra"])
    for column in extra_columns:
        if column not in frame.columns:
            frame[column] = [(e or {}).get(column) if isinstance(e, dict) else None for e in frame["extra"]]
    return frame.drop(columns=["extra"])


def load_expected(session: Session, testset: TestSet) -> set[tuple[int, str]]:
    """The (case_pk, organ) cells of the benchmark: those that some scored or published submission
    of the test set has a score for (an organ absent from a case's ground truth has none)."""
    stmt = (
        sa.select(Score.case_id, Score.organ).distinct()
        .join(Submission, Submission.id == Score.submission_id)
        .where(Submission.testset_id == testset.id, Submission.state.in_(SCOPE_STATES["all"]),
               Score.protocol_key == testset.protocol_key,
               sa.or_(*(getattr(Score, m).is_not(None) for m in board_metrics(testset))))
    )
    return {(int(c), str(o)) for c, o in session.execute(stmt).all()}


#: fields of a score-record array (:func:`score_records`): one row per stored score
def record_dtype(metrics: Sequence[str] = BOARD_METRICS) -> np.dtype:
    """The score-record dtype of these metrics."""
    return np.dtype([("submission", "<i8"), ("case", "<i8"), ("organ", "<i2"),
                     *((m, "<f8") for m in metrics), ("failed", "?")])


RECORD_DTYPE = record_dtype(BOARD_METRICS)


def _record_metrics(records: np.ndarray) -> tuple[str, ...]:
    """The metric fields of a score-record (or packed) array."""
    return tuple(n for n in records.dtype.names if n not in ("submission", "case", "organ", "failed"))


def load_scores(session: Session, submission_ids: Sequence[int], protocol_key: str,
                metrics: Sequence[str] = BOARD_METRICS) -> pd.DataFrame:
    """Long score table of the submissions under ``protocol_key`` on hidden cases (as
    :func:`load_cases`): algorithm (submission id as str), case_pk, organ, dsc, nsd, failed."""
    columns = ["algorithm", "case_pk", "organ", *metrics, "failed"]
    if not submission_ids:
        return pd.DataFrame(columns=columns)
    records, organs = score_records(session, submission_ids, protocol_key, metrics)
    return pd.DataFrame({
        "algorithm": records["submission"].astype(str),
        "case_pk": records["case"],
        "organ": np.asarray(organs, dtype=object)[records["organ"]] if records.size else np.zeros(0, dtype=object),
        **{m: records[m] for m in metrics},
        "failed": records["failed"],
    }, columns=columns)


def score_records(session: Session, submission_ids: Sequence[int], protocol_key: str,
                  metrics: Sequence[str] = BOARD_METRICS) -> tuple[np.ndarray, list[str]]:
    """(records, organs): the stored scores of the submissions under ``protocol_key`` on hidden
    cases as a :data:`RECORD_DTYPE` array (organ = index into ``organs``; a NULL metric is NaN;
    ``failed`` = :func:`is_failure` of the status). On PostgreSQL one binary ``COPY`` parsed by a
    numpy dtype (no Python object per score); elsewhere a plain query."""
    metrics = tuple(metrics)
    if not submission_ids:
        return np.zeros(0, dtype=record_dtype(metrics)), []
    if session.connection().dialect.name == "postgresql":
        records = _score_records_copy(session, submission_ids, protocol_key, metrics)
        if records is not None:
            return records, list(ORGANS)
    stmt = sa.select(
        Score.submission_id, Score.case_id, Score.organ, *(getattr(Score, m) for m in metrics), Score.status
    ).join(Case, Case.id == Score.case_id).where(
        Score.submission_id.in_(list(submission_ids)), Score.protocol_key == protocol_key, Case.public_sample.is_(False)
    )
    rows = session.execute(stmt).all()
    records = np.zeros(len(rows), dtype=record_dtype(metrics))
    if not rows:
        return records, []
    columns = list(zip(*rows))
    records["submission"] = np.asarray(columns[0], dtype=np.int64)
    records["case"] = np.asarray(columns[1], dtype=np.int64)
    organ_codes, organ_names = pd.factorize(pd.Series(columns[2], dtype=object).astype(str))
    for i, metric in enumerate(metrics):
        records[metric] = pd.to_numeric(pd.Series(columns[3 + i], dtype=object), errors="coerce").to_numpy(np.float64)
    status_codes, statuses = pd.factorize(pd.Series(columns[-1], dtype=object), use_na_sentinel=False)
    records["failed"] = np.array([is_failure(None if pd.isna(v) else v) for v in statuses], dtype=bool)[status_codes]
    organs = [o for o in ORGANS if o in set(organ_names)] + sorted(set(organ_names) - set(ORGANS))
    records["organ"] = np.array([organs.index(o) for o in organ_names], dtype=np.int16)[organ_codes]
    return records, organs


def _score_records_copy(session: Session, submission_ids: Sequence[int], protocol_key: str,
                        metrics: Sequence[str] = BOARD_METRICS) -> np.ndarray | None:
    """:func:`score_records` by ``COPY (SELECT ...) TO STDOUT (FORMAT BINARY)``: fixed-width rows
    (organ as its 1-based position in :data:`ORGANS`, NULL metrics as NaN, the failure flag of
    :func:`is_failure` from the statuses that are none) read by one numpy dtype. None when some
    organ is not in :data:`ORGANS` (the caller then takes the plain query)."""
    from evaluation.io import ScoreStatus

    def text(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    not_failed = ["", *(s.value for s in ScoreStatus if not s.is_failure)]
    query = (
        f"SELECT s.submission_id, s.case_id, "
        f"COALESCE(array_position(ARRAY[{','.join(text(o) for o in ORGANS)}]::text[], s.organ::text), 0), "
        + "".join(f"COALESCE(s.{m}, 'NaN'::float8), " for m in metrics)
        + f"(s.status IS NOT NULL AND s.status NOT IN ({','.join(text(v) for v in not_failed)})) "
        f"FROM scores s JOIN cases c ON c.id = s.case_id "
        f"WHERE s.submission_id IN ({','.join(str(int(i)) for i in submission_ids)}) "
        f"AND s.protocol_key = {text(protocol_key)} AND NOT c.public_sample"
    )
    fields = [("n", ">i2"), ("l_sub", ">i4"), ("sub", ">i4"), ("l_case", ">i4"), ("case", ">i4"),
              ("l_organ", ">i4"), ("organ", ">i4")]
    for m in metrics:
        fields += [(f"l_{m}", ">i4"), (m, ">f8")]
    dtype = np.dtype([*fields, ("l_failed", ">i4"), ("failed", "u1")])
    buffer = io.BytesIO()
    with session.connection().connection.dbapi_connection.cursor() as cursor:
        with cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
            for block in copy:
                buffer.write(block)
    data = buffer.getbuffer()
    body = data[19:len(data) - 2]  # 19-byte header, int16 -1 trailer
    if len(body) % dtype.itemsize:
        raise RuntimeError("unexpected layout of the binary COPY of the scores")
    rows = np.frombuffer(body, dtype=dtype)
    if rows.size and (rows["organ"] == 0).any():
        return None
    records = np.zeros(rows.size, dtype=record_dtype(metrics))
    records["submission"], records["case"] = rows["sub"], rows["case"]
    records["organ"] = rows["organ"] - 1
    for m in metrics:
        records[m] = rows[m]
    records["failed"] = rows["failed"].astype(bool)
    return records


def expected_from_records(records: np.ndarray, organs: Sequence[str]) -> set[tuple[int, str]]:
    """The (case_pk, organ) cells of :func:`load_expected` from the score records of every scored
    or published submission (hidden cases): those with a value."""
    has_value = np.zeros(records.size, dtype=bool)
    for metric in _record_metrics(records):
        has_value |= ~np.isnan(records[metric])
    width = max(len(organs), 1)
    # a hash of millions (pd.unique) rather than their sort; the set is unordered anyway
    cells = pd.unique(records["case"][has_value].astype(np.int64) * width + records["organ"][has_value])
    return {(int(c // width), str(organs[c % width])) for c in cells.tolist()}


def _records_from_frame(scores: pd.DataFrame, metrics: Sequence[str] = BOARD_METRICS) -> tuple[np.ndarray, list[str]]:
    records = np.zeros(len(scores), dtype=record_dtype(metrics))
    organ_codes, organ_names = pd.factorize(scores["organ"].astype(str))
    organs = [o for o in ORGANS if o in set(organ_names)] + sorted(set(organ_names) - set(ORGANS))
    if len(scores):
        records["organ"] = np.array([organs.index(o) for o in organ_names], dtype=np.int16)[organ_codes]
    records["case"] = scores["case_pk"].to_numpy(dtype=np.int64)
    for metric in metrics:
        records[metric] = pd.to_numeric(scores[metric], errors="coerce").to_numpy(dtype=np.float64)
    records["failed"] = scores["failed"].fillna(False).to_numpy(dtype=bool) if "failed" in scores else False
    return records, organs


def _case_columns(case_pks: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """The position in ``case_pks`` of each scored case pk; -1 where it is none of them. A lookup
    table indexed by pk when the pks are dense enough (row ids: a table of at most a few times the
    rows), else a search."""
    out = np.full(scored.size, -1, dtype=np.int64)
    if not case_pks.size or not scored.size:
        return out
    if np.unique(case_pks).size != case_pks.size:
        raise ValueError("the test set's case pks are not unique")
    largest = int(max(case_pks.max(), scored.max()))
    if 0 <= min(case_pks.min(), scored.min()) and largest < 4 * (case_pks.size + scored.size) + 4096:
        table = np.full(largest + 1, -1, dtype=np.int64)
        table[case_pks] = np.arange(case_pks.size)
        return table[scored]
    order = np.argsort(case_pks, kind="stable")
    pk_sorted = case_pks[order]
    at = np.minimum(np.searchsorted(pk_sorted, scored), pk_sorted.size - 1)
    return np.where(pk_sorted[at] == scored, order[at], -1)


def matrices_from_records(records: np.ndarray, organs: Sequence[str], rows: np.ndarray, cases: pd.DataFrame,
                          algorithms: Sequence[str]) -> dict[tuple[str, str], ScoreMatrix]:
    """What :func:`evaluation.stats.score_matrices_from_long` makes of these scores over the test
    set's case axis (``cases`` order), built by indexing arrays instead of pivoting frames:
    ``rows[r]`` = the algorithm (row) of record ``r`` (-1: not in ``algorithms``, left out);
    organs present in :data:`ORGANS` order, then others sorted; no row = NaN, not failed."""
    case_pks = cases["case_pk"].to_numpy(dtype=np.int64)
    case_ids = tuple(str(c) for c in cases["case_id"])
    keep = rows >= 0
    if not keep.all():  # (a copy of millions of records otherwise)
        records, rows = records[keep], rows[keep]
    column = _case_columns(case_pks, records["case"])
    if (column < 0).any():
        unknown = sorted(set(records["case"][column < 0].tolist()))
        raise ValueError(f"{len(unknown)} scored case(s) are not cases of the test set, e.g. {unknown[:5]}")
    cell = (rows * len(case_ids) + column) * max(len(organs), 1) + records["organ"]
    # one flag per cell of the dense matrices this builds anyway (a sort of millions is slower)
    seen = np.zeros(len(algorithms) * len(case_ids) * max(len(organs), 1), dtype=bool)
    seen[cell] = True
    if np.count_nonzero(seen) != cell.size:
        raise ValueError("score table has duplicate (algorithm, case, organ) rows")
    shape = (len(algorithms), len(case_ids))
    present = set(np.unique(records["organ"]).tolist())
    names = [organs[o] for o in present]
    ordered = [o for o in ORGANS if o in names] + sorted(set(names) - set(ORGANS))
    out: dict[tuple[str, str], ScoreMatrix] = {}
    # grouped by organ once (a stable counting sort of small ints), then each organ is a slice
    by_organ = np.argsort(records["organ"], kind="stable")
    flat_cell = (rows * len(case_ids) + column)[by_organ]
    grouped = {name: records[name][by_organ] for name in ("organ", "failed", *_record_metrics(records))}
    bounds = np.searchsorted(grouped["organ"], np.arange(len(organs) + 1))
    for organ in ordered:
        index = organs.index(organ)
        sel = slice(bounds[index], bounds[index + 1])
        cells = flat_cell[sel]
        failed = np.zeros(shape, dtype=bool)
        failed.ravel()[cells] = grouped["failed"][sel]
        for metric in _record_metrics(records):
            values = np.full(shape, np.nan)
            values.ravel()[cells] = grouped[metric][sel]
            if metric in LESION_METRICS and np.isnan(values).all():
                continue  # an organ of a lesion protocol: no lesion metric (never computed)
            out[(organ, metric)] = ScoreMatrix(organ=organ, metric=metric, algorithms=tuple(algorithms),
                                               case_ids=case_ids, values=values, failed=failed,
                                               higher_is_better=higher_is_better(metric))
    return out


def _frame_matrices(scores: pd.DataFrame, cases: pd.DataFrame, algorithms: Sequence[str],
                    metrics: Sequence[str] = BOARD_METRICS) -> dict[tuple[str, str], ScoreMatrix]:
    records, organs = _records_from_frame(scores, metrics)
    row_of = {str(a): i for i, a in enumerate(algorithms)}
    rows = scores["algorithm"].astype(str).map(row_of).fillna(-1).to_numpy(dtype=np.int64)
    return matrices_from_records(records, organs, rows, cases, [str(a) for a in algorithms])


#: one packed score (:class:`~services.db.models.PackedScores`): case pk, organ index, metrics, failed
def packed_dtype(metrics: Sequence[str] = BOARD_METRICS) -> np.dtype:
    """The packed-score dtype of these metrics (a protocol key always has the same metrics)."""
    return np.dtype([("case", "<i4"), ("organ", "<i2"), *((m, "<f8") for m in metrics), ("failed", "u1")])


PACKED_DTYPE = packed_dtype(BOARD_METRICS)


def packed_records(session: Session, submission_ids: Sequence[int], protocol_key: str,
                   refresh: Iterable[int] = (), metrics: Sequence[str] = BOARD_METRICS) -> tuple[np.ndarray, list[str]]:
    """:func:`score_records` of the submissions, read from their packed scores (one blob per
    submission) where stored; the submissions in ``refresh`` (their scores may have changed) and
    those without packed scores are read from ``scores`` and (re)packed."""
    metrics = tuple(metrics)
    packed_type, record_type = packed_dtype(metrics), record_dtype(metrics)
    ids = sorted({int(i) for i in submission_ids})
    refresh = {int(i) for i in refresh} & set(ids)
    stored = {}
    if set(ids) - refresh:
        stored = {row.submission_id: row for row in session.execute(
            sa.select(PackedScores.submission_id, PackedScores.organs, PackedScores.data)
            .where(PackedScores.submission_id.in_(sorted(set(ids) - refresh)),
                   PackedScores.protocol_key == protocol_key))}
    todo = [i for i in ids if i not in stored]
    parts: list[tuple[np.ndarray, list[str]]] = []
    for start in range(0, len(todo), 10):  # bounded memory: ten submissions' rows at a time
        chunk = todo[start:start + 10]
        records, organs = score_records(session, chunk, protocol_key, metrics)
        session.execute(sa.delete(PackedScores).where(PackedScores.submission_id.in_(chunk),
                                                      PackedScores.protocol_key == protocol_key))
        rows = []
        for submission_id in chunk:
            mine = records[records["submission"] == submission_id]
            packed = np.zeros(mine.size, dtype=packed_type)
            for name in packed_type.names:
                packed[name] = mine[name]
            rows.append({"submission_id": submission_id, "protocol_key": protocol_key, "organs": list(organs),
                         "n_scores": int(mine.size), "data": packed.tobytes(), "computed_at": utcnow()})
        session.execute(sa.insert(PackedScores), rows)
        parts.append((records, organs))
    for submission_id, row in stored.items():
        packed = np.frombuffer(row.data, dtype=packed_type)
        records = np.zeros(packed.size, dtype=record_type)
        records["submission"] = submission_id
        for name in packed_type.names:
            records[name] = packed[name]
        parts.append((records, list(row.organs)))
    return _merge_records(parts, record_type)


def _merge_records(parts: Sequence[tuple[np.ndarray, list[str]]], dtype: np.dtype = RECORD_DTYPE
                   ) -> tuple[np.ndarray, list[str]]:
    """One record array over one organ list (:data:`ORGANS` order, then others sorted)."""
    names = {o for _, organs in parts for o in organs}
    organs = [o for o in ORGANS if o in names] + sorted(names - set(ORGANS))
    index = {o: i for i, o in enumerate(organs)}
    merged = []
    for records, own in parts:
        if records.size:
            if list(own) != organs[:len(own)]:  # (the usual case, the same organ list, needs no copy)
                remap = np.array([index[o] for o in own], dtype=np.int16)
                records = records.copy()
                records["organ"] = remap[records["organ"]]
            merged.append(records)
    return (np.concatenate(merged) if merged else np.zeros(0, dtype=dtype)), organs


def build_matrices(
    scores: pd.DataFrame,
    cases: pd.DataFrame,
    algorithms: Sequence[str],
    options: StatsOptions | None = None,
    expected: set[tuple[int, str]] | None = None,
) -> tuple[dict[tuple[str, str], ScoreMatrix], dict[tuple[str, str], np.ndarray]]:
    """``({(organ, metric): ScoreMatrix}, {(organ, metric): missing})`` over every case of the test
    set, organs plus ``average``; ``missing`` marks the (algorithm, case) cells left without a value
    (what ``n_missing`` counts).

    Under the ``worst`` policy the missing cells of the benchmark (``expected``, default: cells
    some algorithm here scored) hold the protocol's worst value and are marked ``failed`` (a
    missing case counts like a failed prediction); under ``common`` they stay NaN. The average follows ``options.organ_average``. Organs nobody scored are absent.
    """
    options = options or DEFAULT_OPTIONS
    if scores.empty or not len(algorithms):
        return {}, {}
    return _complete_matrices(_frame_matrices(scores, cases, algorithms, options.metrics), cases, options, expected)


def _complete_matrices(
    matrices: dict[tuple[str, str], ScoreMatrix],
    cases: pd.DataFrame,
    options: StatsOptions,
    expected: set[tuple[int, str]] | None,
) -> tuple[dict[tuple[str, str], ScoreMatrix], dict[tuple[str, str], np.ndarray]]:
    """:func:`build_matrices` after the score matrices: the missing-case policy and the average."""
    case_of = dict(zip(cases["case_pk"], cases["case_id"].astype(str)))
    expected_by_organ: dict[str, set[str]] | None = None
    if expected is not None:
        expected_by_organ = {}
        for case_pk, organ in expected:
            if case_pk in case_of:
                expected_by_organ.setdefault(organ, set()).add(case_of[case_pk])
    for key, m in list(matrices.items()):
        if expected_by_organ is None:
            want = m.scored.any(axis=0)
        else:
            wanted = expected_by_organ.get(key[0], set())
            want = np.array([c in wanted for c in m.case_ids], dtype=bool) | m.scored.any(axis=0)
        fill = np.isnan(m.values) & want[None, :]
        if options.missing_policy == "worst" and fill.any():
            # a missing case is scored like a failed prediction: the worst value, counted in n_failed
            matrices[key] = ScoreMatrix(organ=m.organ, metric=m.metric, algorithms=m.algorithms,
                                        case_ids=m.case_ids, values=np.where(fill, options.worst[m.metric], m.values),
                                        failed=m.failed | fill, higher_is_better=m.higher_is_better)
    for metric in options.metrics:
        # DSC/NSD: the average over organs only (not a protocol's lesion classes); a lesion metric
        # exists only for lesion classes and is averaged over them
        keys = [k for k in matrices if k[1] == metric and k[0] != AVERAGE_ORGAN
                and (metric in LESION_METRICS or k[0] not in options.lesion_classes)]
        if keys:
            matrices[(AVERAGE_ORGAN, metric)] = average_over_organs([matrices[k] for k in keys],
                                                                     rule=options.organ_average)
    # n + n_missing is always the group's hidden cases (what small-cell suppression counts)
    missing = {key: np.isnan(m.values) for key, m in matrices.items()}
    return matrices, missing


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
                confidence: float, ci_method: str = "percentile", missing: np.ndarray | None = None,
                resamples: ResampleCache | None = None) -> dict:
    """The :func:`evaluation.stats.summary.summary_records` (the rows of ``summarize``) of one algorithm's scores over a set of cases (``NaN`` =
    not scored), as an Aggregate row stores it: n (scored), mean, median, std (ddof 1), the
    bootstrap intervals of mean and median by ``ci_method`` (percentile, or BCa: the jackknife
    only then), n_failed, n_missing (``missing.sum()`` when given, else the NaN); None for what
    is not finite. ``resamples``: summarize's draw cache, kept across the calls of one submission."""
    matrix = ScoreMatrix("", "", ("",), tuple(map(str, range(values.size))), values[None, :],
                         failed=np.asarray(failed, dtype=bool)[None, :])
    row = summary_records(matrix, confidence=confidence, n_resamples=n_resamples, seed=seed,
                          bca=ci_method == "bca", resamples=resamples)[0]
    method = "bca" if ci_method == "bca" else "percentile"
    n = int(row["n_scored"])
    return {
        "n": n,
        "mean": finite_or_none(row["mean"]),
        "median": finite_or_none(row["median"]),
        "std": finite_or_none(row["std"]),
        "ci_low": finite_or_none(row[f"mean_ci_low_{method}"]),
        "ci_high": finite_or_none(row[f"mean_ci_high_{method}"]),
        "median_ci_low": finite_or_none(row[f"median_ci_low_{method}"]),
        "median_ci_high": finite_or_none(row[f"median_ci_high_{method}"]),
        "n_failed": int(row["n_failed"]),
        "n_missing": int(missing.sum()) if missing is not None else int(values.size - n),
        "ci_method": ci_method,
    }


def submission_aggregate_rows(
    matrices: dict[tuple[str, str], ScoreMatrix], cases: pd.DataFrame, options: StatsOptions = DEFAULT_OPTIONS,
    missing: dict[tuple[str, str], np.ndarray] | None = None, variables: Sequence[str] = BREAKDOWNS,
) -> list[dict]:
    """Aggregate rows (dicts: organ, metric, scope, group_value + the statistics) of the one
    algorithm of ``matrices``: ``overall`` over every case, then per group of each breakdown
    variable that any case has a value of (cases without a value form the group ``unknown``,
    groups are never dropped, however small: ``too_small`` when n < ``options.min_group_size``)."""
    rows: list[dict] = []
    if not matrices:
        return rows
    missing = missing or {}
    metadata = cases.assign(case_id=cases["case_id"].astype(str))
    case_ids = next(iter(matrices.values())).case_ids
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for variable in variables:
        try:
            labels = group_labels(metadata, variable, case_ids)
        except ValueError:
            continue  # a variable no case has (e.g. an extra column of another test set)
        if (labels == UNKNOWN_GROUP).all():
            continue  # no case has this metadata: no breakdown to show
        groups[variable] = [(g, labels == g) for g in sorted(set(labels) - {UNKNOWN_GROUP})]
        if UNKNOWN_GROUP in labels:
            groups[variable].append((UNKNOWN_GROUP, labels == UNKNOWN_GROUP))
    k = options.min_group_size
    resamples = ResampleCache()  # the draws depend only on (seed, n, B): shared across organs and metrics
    for matrix in matrices.values():
        if matrix.n_algorithms != 1 or matrix.case_ids != case_ids:
            raise ValueError("submission_aggregate_rows needs one-algorithm matrices over the same cases")

    def matrix_rows(organ: str, metric: str, matrix: ScoreMatrix) -> list[dict]:
        values, failed = matrix.values[0], matrix.failed[0]
        miss = missing.get((organ, metric))
        miss = miss[0] if miss is not None else None
        row = summary_row(values, failed, n_resamples=options.n_resamples, seed=options.seed,
                          confidence=options.confidence, ci_method=options.ci_method, missing=miss,
                          resamples=resamples)
        out = [{"organ": organ, "metric": metric, "scope": "overall", "group_value": "",
                **row, "too_small": row["n"] < k}]
        # the small-cell rule across every breakdown (services/leaderboard/suppression.py): the
        # counted cases are those summary_row's n counts (a value after the missing-case policy)
        withheld = withheld_groups(~np.isnan(values), {(v, g): m for v, masks in groups.items() for g, m in masks}, k)
        for variable, masks in groups.items():
            for group, mask in masks:
                row = summary_row(values[mask], failed[mask], n_resamples=options.group_resamples,
                                  seed=options.seed, confidence=options.confidence, ci_method=options.ci_method,
                                  missing=miss[mask] if miss is not None else None, resamples=resamples)
                out.append({"organ": organ, "metric": metric, "scope": variable, "group_value": group,
                            **row, "too_small": row["n"] < k, "withheld": (variable, group) in withheld})
        return out

    # the matrices run on STATS_THREADS threads: numpy's gathers, sums and selections release the
    # GIL, each matrix's rows depend only on its own values (same rows, same order), and each
    # draw is made once, by the first thread to need it (ResampleCache)
    with _stats_threads() as pool:
        for part in pool.map(lambda item: matrix_rows(*item[0], item[1]), matrices.items()):
            rows += part
    return rows


def store_submission_aggregates(
    session: Session,
    submission: Submission,
    testset: TestSet,
    cases: pd.DataFrame | None = None,
    options: StatsOptions | None = None,
    expected: set[tuple[int, str]] | None = None,
) -> int:
    """Replace the submission's aggregates under the test set's protocol key; returns rows written.
    ``options`` default to :func:`options_for_testset`; ``expected`` to :func:`load_expected`."""
    protocol_key = testset.protocol_key
    options = options or options_for_testset(testset)
    variables = breakdown_variables(testset)
    cases = load_cases(session, testset.id, _extra_columns(variables)) if cases is None else cases
    expected = load_expected(session, testset) if expected is None else expected
    algorithm = str(submission.id)
    scores = load_scores(session, [submission.id], protocol_key, options.metrics)
    matrices, missing = build_matrices(scores, cases, [algorithm], options, expected)
    rows = submission_aggregate_rows(matrices, cases, options, missing, variables)
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


def _extra_columns(variables: Sequence[str]) -> list[str]:
    return [v for v in variables if v not in METADATA_FIELDS and v != "age_decade"]


# --------------------------------------------------------------------------------------------
# comparative statistics of a test set
# --------------------------------------------------------------------------------------------


@contextmanager
def _stats_threads() -> Iterator[ThreadPoolExecutor]:
    """A pool of :data:`STATS_THREADS` threads, with BLAS held to one thread each meanwhile:
    OpenBLAS's own threads on top of ours oversubscribe the cores (a 100-submission update took
    9.6 s with them, 8.9 s without)."""
    # the BLAS limit is process-wide: runs that overlap in one process (API requests publishing
    # on two test sets) take turns, so none restores the setting while another still needs it
    with _blas_lock, threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=STATS_THREADS) as pool:
        yield pool


_blas_lock = threading.Lock()


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
    matrices: dict[tuple[str, str], ScoreMatrix], options: StatsOptions = DEFAULT_OPTIONS,
    pairs: PairCache | FreshPairs | None = None, counts: dict[int, np.ndarray] | None = None,
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(runs, rankings, pairwise families, stability) rows -- dicts keyed by the table columns minus
    (testset_id, protocol_key, scope; one pairwise family per matrix: every ordered pair packed,
    :func:`~services.leaderboard.pairwise.pack_family`) -- for every (organ, metric) matrix (as
    :func:`build_matrices` gives them under ``options.missing_policy``).

    ``pairs`` supplies the raw pair tests (:class:`~services.leaderboard.pairwise.PairCache`:
    cached where the pair's inputs are unchanged; default: every pair computed); the correction,
    test-then-rank, rankings and the bootstrap are computed here from them. ``counts`` keeps the
    bootstrap's resample counts per number of cases across calls (the same draw for every matrix
    with N cases: ``resample_counts(default_rng(seed), N, B)``)."""
    with _frozen_gc():
        return _comparative_rows(matrices, options, pairs or FreshPairs(options.wilcoxon),
                                 {} if counts is None else counts)


def ranking_matrix(matrix: ScoreMatrix, options: StatsOptions) -> ScoreMatrix:
    """The cases a ranking compares on: under ``worst`` the benchmark's cases (missing ones already
    hold the worst value); under ``common`` the cases every algorithm of ``matrix`` has."""
    if options.missing_policy == "common":
        return apply_missing_policy(matrix, "common")
    return apply_missing_policy(matrix, "worst", worst=options.worst.get(matrix.metric, 0.0))


def _comparative_rows(
    matrices: dict[tuple[str, str], ScoreMatrix], options: StatsOptions, pairs: PairCache | FreshPairs,
    counts: dict[int, np.ndarray],
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    method_name = options.method_name()

    def matrix_rows(organ: str, metric: str, matrix: ScoreMatrix) -> tuple[dict, list[dict], dict, list[dict]]:
        key = {"organ": organ, "metric": metric}
        rankings: list[dict] = []
        stability_rows: list[dict] = []
        ranked = ranking_matrix(matrix, options)
        # worst: every test on the filled matrix; common: each pair on the cases both have
        pairwise = pairwise_table(matrix, pairs.pair_tests(matrix), correction=options.correction,
                                  alpha=options.alpha, family=options.family)
        family = {**key, "method": method_name, "n_pairs": len(pairwise), "data": pack_family(pairwise)}
        # test-then-rank: under common, the tests on the cases every algorithm has
        ranked_pairs = pairwise if options.missing_policy == "worst" else pairwise_table(
            ranked, pairs.pair_tests(ranked), correction=options.test_correction, alpha=options.alpha,
            family=options.family)
        for method in RANKING_METHODS:
            table = rank(ranked, method, pairwise=ranked_pairs, alpha=options.alpha,
                         correction=options.test_correction, options=options.wilcoxon, family=options.family)
            for row in table.itertuples(index=False):
                rankings.append({**key, "method": method, "submission_id": int(row.algorithm),
                                 "value": finite_or_none(row.value), "rank": int(row.rank)})
        tau: dict[str, dict] = {}
        if ranked.n_cases and ranked.n_algorithms:
            for method in STABILITY_METHODS:
                with counts_lock:  # drawn once per number of cases, by the first thread to need it
                    if ranked.n_cases not in counts:
                        counts[ranked.n_cases] = resample_counts(np.random.default_rng(options.seed),
                                                                 ranked.n_cases, options.n_resamples)
                stab = bootstrap_rank_stability(ranked, method, n_resamples=options.n_resamples, seed=options.seed,
                                                confidence=options.confidence, counts=counts[ranked.n_cases])
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
            "options": {k: v for k, v in asdict(options).items() if k not in ("wilcoxon", "worst")},
            "wilcoxon": asdict(options.wilcoxon),
            "pairwise_method": method_name,
            "kendall_tau": tau,
            **options.describe(),
            "footer": options.footer(),
            "n_ranked": ranked.n_cases,
            "n_scored": {a: int(n) for a, n in zip(matrix.algorithms, (~np.isnan(matrix.values)).sum(axis=1))},
        }
        run = {**key, "n_submissions": matrix.n_algorithms, "n_cases": matrix.n_cases, "details": details}
        return run, rankings, family, stability_rows

    runs, rankings, families, stability = [], [], [], []
    counts_lock = threading.Lock()
    # the matrices run on STATS_THREADS threads (the pair tests, rankings and bootstraps of one
    # matrix depend on it alone and release the GIL in numpy; the pair cache locks its own
    # state, the bootstrap counts are drawn under counts_lock): rows in matrix order
    pairs.prepare()  # the pair cache's one query, in this thread
    with _stats_threads() as pool:
        for run, ranking_rows, family, stability_rows in pool.map(lambda item: matrix_rows(*item[0], item[1]),
                                                                  matrices.items()):
            runs.append(run)
            rankings += ranking_rows
            families.append(family)
            stability += stability_rows
    return runs, rankings, families, stability


# (its parameters repeat store_submission_aggregates': both take the inputs that one
# recomputation reads once and hands to each step)
def store_comparative(
    session: Session,
    testset: TestSet,
    scope: str,
    cases: pd.DataFrame | None = None,
    options: StatsOptions | None = None,
    cache: dict | None = None,
    expected: set[tuple[int, str]] | None = None,
    scores: tuple[np.ndarray, list[str]] | None = None,
    pairs: PairCache | FreshPairs | None = None,
) -> tuple[int, int, int, int]:
    """Replace the (test set, protocol, scope) rows of the comparative tables; returns counts
    (runs, rankings, ordered pairs tested, stability). ``cache`` (a dict kept across scopes) reuses the rows
    when two scopes hold the same submissions (the common case: everything scored is published)
    and the bootstrap's resample counts; ``scores`` are the :func:`score_records` of (at least)
    the scope's submissions (default: read); ``pairs`` the pair tests (default: all computed)."""
    protocol_key = testset.protocol_key
    options = options or options_for_testset(testset)
    cases = load_cases(session, testset.id) if cases is None else cases
    expected = load_expected(session, testset) if expected is None else expected
    ids = scope_submission_ids(session, testset.id, scope)
    cache = {} if cache is None else cache
    if tuple(ids) not in cache:
        records, organs = score_records(session, ids, protocol_key, options.metrics) if scores is None else scores
        # submissions without a single score under this protocol are not ranked
        present = set(pd.unique(records["submission"]).tolist())
        ranked_ids = [i for i in ids if i in present]
        row_of = np.full(max([*present, *ranked_ids, 0]) + 1, -1, dtype=np.int64)
        row_of[ranked_ids] = np.arange(len(ranked_ids))
        rows = row_of[records["submission"]] if records.size else np.zeros(0, dtype=np.int64)
        algorithms = [str(i) for i in ranked_ids]
        matrices: dict = {}
        if algorithms and records.size:
            matrices, _ = _complete_matrices(matrices_from_records(records, organs, rows, cases, algorithms),
                                             cases, options, expected)
        cache[tuple(ids)] = comparative_rows(matrices, options, pairs, cache.setdefault("counts", {}))
    runs, rankings, pairwise, stability = cache[tuple(ids)]
    fingerprint = _fingerprint(expected, options)
    inputs = _scope_inputs(ids, fingerprint, options)
    runs = [{**r, "details": {**r["details"], "fingerprint": fingerprint, "inputs": inputs}} for r in runs]
    now = utcnow()
    for model, rows in ((StatsRun, runs), (RankingEntry, rankings), (PairwiseFamily, pairwise),
                        (RankStability, stability)):
        session.execute(
            sa.delete(model).where(
                model.testset_id == testset.id, model.protocol_key == protocol_key, model.scope == scope
            )
        )
        if rows:
            extra = {"testset_id": testset.id, "protocol_key": protocol_key, "scope": scope}
            if model in (StatsRun, PairwiseFamily):
                extra["computed_at"] = now
            bulk_insert(session, model, [{**r, **extra} for r in rows])
    return len(runs), len(rankings), sum(f["n_pairs"] for f in pairwise), len(stability)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def _fingerprint(expected: set[tuple[int, str]], options: StatsOptions) -> str:
    """Hash of the benchmark's cells and the settings the stored aggregates depend on."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for case_pk, organ in sorted(expected):
        digest.update(f"{case_pk}:{organ};".encode())
    settings = {"policy": options.missing_policy, "ci": options.ci_method, "avg": options.organ_average,
                "k": options.min_group_size, "worst": options.worst}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _scope_inputs(ids: Sequence[int], fingerprint: str, options: StatsOptions) -> str:
    """Hash of everything a scope's comparative rows depend on besides its members' scores: the
    members, the benchmark's cells and settings (``fingerprint``), every statistical option."""
    import hashlib
    import json

    settings = {"members": [int(i) for i in ids], "fingerprint": fingerprint,
                "options": json.loads(json.dumps(asdict(options), default=str))}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _scope_unchanged(session: Session, testset: TestSet, scope: str, ids: Sequence[int], fingerprint: str,
                     options: StatsOptions, changed: Iterable[int]) -> bool:
    """Whether the scope's stored rows are what a recomputation would write: the same inputs
    (:func:`_scope_inputs`) and no member whose scores are being re-read (``changed``)."""
    if set(ids) & set(changed):
        return False
    details = session.scalar(sa.select(StatsRun.details).where(
        StatsRun.testset_id == testset.id, StatsRun.protocol_key == testset.protocol_key,
        StatsRun.scope == scope).limit(1))
    return bool(details) and details.get("inputs") == _scope_inputs(ids, fingerprint, options)


def _stored_fingerprint(session: Session, testset: TestSet) -> str | None:
    details = session.scalar(
        sa.select(StatsRun.details).where(StatsRun.testset_id == testset.id,
                                          StatsRun.protocol_key == testset.protocol_key,
                                          StatsRun.scope == "all").limit(1)
    )
    return (details or {}).get("fingerprint") if details is not None else None


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
    options: StatsOptions | None = None,
    protocol_key: str | None = None,
    full: bool = False,
) -> RecomputeReport:
    """Recompute the aggregates of ``submission_ids`` and the comparative statistics of ``scopes``
    under the test set's policy and options (:func:`options_for_testset`; ``options`` only give
    the resampling settings), from the scores of ``protocol_key`` (default: the test set's
    current protocol; another of its versions, see :mod:`.versions`).

    Incremental by default: the scores of ``submission_ids`` are read from ``scores`` (and
    re-packed), every other member's from its packed scores; each pair test whose inputs are
    unchanged comes from the pairwise cache (:mod:`.pairwise`), so a new submission costs the
    tests of its own pairs. ``full=True`` reads every score and re-tests every pair (refilling
    both caches; the aggregates are still those of ``submission_ids``: ``recompute_all`` passes
    every submission -- ``touchstone stats recompute``). Both write the same rows.
    ``RecomputeReport.seconds`` times the stages."""
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock
        clock = now

    testset = versions.under_protocol(session, _lock_testset(session, testset.id), protocol_key)
    options = options_for_testset(testset, options)
    cases = load_cases(session, testset.id, _extra_columns(breakdown_variables(testset)))
    members = scope_submission_ids(session, testset.id, "all")
    submission_ids = [int(i) for i in submission_ids]
    records, organs = packed_records(session, members, testset.protocol_key,
                                     refresh=members if full else submission_ids, metrics=options.metrics)
    expected = expected_from_records(records, organs)
    report = RecomputeReport(testset=testset.name, protocol_key=testset.protocol_key, seconds=seconds)
    lap("scores")
    fingerprint = _fingerprint(expected, options)
    if _stored_fingerprint(session, testset) not in (None, fingerprint):
        # the benchmark's cells or the settings changed (a submission scored an organ nobody had
        # scored, new options): every submission's missing cases and aggregates change with them
        submission_ids = sorted(set(submission_ids) | set(members))
    for submission_id in submission_ids:
        submission = session.get(Submission, submission_id)
        if submission is None or submission.testset_id != testset.id:
            raise LookupError(f"submission {submission_id} is not a submission of test set {testset.name!r}")
        report.aggregates += store_submission_aggregates(session, submission, testset, cases, options, expected)
    lap("aggregates")
    pairs = PairCache(session, testset.id, testset.protocol_key, options.wilcoxon, reuse=not full)
    cache: dict = {}
    computed_scopes = []
    for scope in scopes:
        scope_ids = scope_submission_ids(session, testset.id, scope)
        if not full and _scope_unchanged(session, testset, scope, scope_ids, fingerprint, options, submission_ids):
            # e.g. the published scope when a submission is scored: its rows stand as they are
            report.submissions[scope] = len(scope_ids)
            report.unchanged.append(scope)
            continue
        computed_scopes.append(scope)
        _, n_rank, n_pair, n_stab = store_comparative(session, testset, scope, cases, options, cache, expected,
                                                      scores=(records, organs), pairs=pairs)
        report.rankings += n_rank
        report.pairwise += n_pair
        report.stability += n_stab
        report.submissions[scope] = len(scope_submission_ids(session, testset.id, scope))
    lap("comparative")
    pairs.flush()
    pairs.prune(members, every_scope=set(SCOPES) <= set(computed_scopes))
    report.pairs_tested, report.pairs_reused = pairs.computed, pairs.reused
    session.flush()
    lap("cache")
    log.info("leaderboard of %s (%s) recomputed: %s", testset.name, testset.protocol_key, report)
    return report


def on_submission_scored(
    session: Session, submission_id: int, options: StatsOptions | None = None, *, full: bool = False
) -> RecomputeReport:
    """Recompute and store everything the leaderboard shows after ``submission_id`` was scored,
    published or unpublished: its aggregates (when it has scores, i.e. it is scored or published)
    and the rankings, pairwise tests and rank stability of its test set in both scopes --
    incrementally (only the pairs it is in are tested) unless ``full`` (:func:`recompute_testset`).

    Idempotent; the caller commits. Raises :class:`LookupError` for an unknown submission.
    """
    submission = session.get(Submission, submission_id)
    if submission is None:
        raise LookupError(f"no submission {submission_id}")
    with_scores = submission.state in (SubmissionState.scored, SubmissionState.published)
    report = recompute_testset(
        session, submission.testset, submission_ids=[submission_id] if with_scores else [], options=options,
        full=full,
    )
    for other in versions.other_protocols(session, submission.testset):
        # the scopes of every protocol version change with a publication (re-scored versions too)
        rescored = with_scores and session.scalar(sa.select(Score.id).where(
            Score.submission_id == submission_id, Score.protocol_key == other.protocol_key).limit(1)) is not None
        recompute_testset(session, submission.testset, submission_ids=[submission_id] if rescored else [],
                          options=options, protocol_key=other.protocol_key, full=full)
    return report


def recompute_all(session: Session, testset: TestSet, options: StatsOptions | None = None, *,
                  full: bool = False) -> RecomputeReport:
    """Recompute every statistic of the test set (the aggregates of all its scored and published
    submissions and both scopes): what a change of policy, options or subgroups needs. Scores
    are untouched. ``full``: also every pair test and every packed score from the scores
    (``touchstone stats recompute``). The caller commits."""
    ids = scope_submission_ids(session, testset.id, "all")
    report = recompute_testset(session, testset, submission_ids=ids, options=options, full=full)
    for other in versions.other_protocols(session, testset):
        recompute_protocol_version(session, testset, other.protocol_key, options, full=full)
    return report


def recompute_protocol_version(session: Session, testset: TestSet, protocol_key: str,
                               options: StatsOptions | None = None, *, full: bool = False) -> RecomputeReport:
    """Recompute every statistic of the test set under one of its protocol versions: the
    aggregates of the submissions with scores under it and both scopes. The caller commits."""
    ids = [i for i in scope_submission_ids(session, testset.id, "all") if session.scalar(
        sa.select(Score.id).where(Score.submission_id == i, Score.protocol_key == protocol_key).limit(1)) is not None]
    return recompute_testset(session, testset, submission_ids=ids, options=options, protocol_key=protocol_key,
                             full=full)
