"""The input of every statistic: one score matrix per (organ, metric).

A :class:`ScoreMatrix` holds the scores of ``K`` algorithms on the ``N`` cases of one test set for
one organ and one metric, as a ``(K, N)`` float array. ``NaN`` means *not scored* (the algorithm has
no score for that case: not run, or an imported result with an empty cell). A failed prediction
that the scorer gave the worst value is *scored* (a number, e.g. DSC 0); the optional ``failed``
mask says which scores came from failures, so that summaries can count them.

Direction: every statistic reads "better" from :data:`HIGHER_IS_BETTER` -- the metric registry's
(:mod:`evaluation.metric_registry`), or the matrix's ``higher_is_better``: DSC and NSD are better
when higher, HD95 and ASSD (mm) when lower; of the lesion metrics, ``lesion_fp`` and ``lesion_fn``
(counts) are better when lower, the others when higher.
Internally the statistics work on the *oriented* scores ``s = +x`` (higher better) or ``s = -x``
(lower better), so that "A better than B" always means ``s_A > s_B``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from evaluation.labels import ORGANS
from evaluation.metric_registry import HIGHER_IS_BETTER  # metric name -> True when higher is better

#: the organ name used for the per-case average over organs (see :func:`average_over_organs`)
AVERAGE_ORGAN = "average"


def higher_is_better(metric: str, overrides: Mapping[str, bool] | None = None) -> bool:
    """Whether a higher value of ``metric`` is better; raise a clear error for an unknown metric."""
    if overrides and metric in overrides:
        return bool(overrides[metric])
    try:
        return HIGHER_IS_BETTER[metric]
    except KeyError:
        raise ValueError(
            f"unknown metric {metric!r}: its direction is not known; pass "
            f"higher_is_better={{{metric!r}: True or False}} (known: {sorted(HIGHER_IS_BETTER)})"
        ) from None


@dataclass(frozen=True, eq=False)
class ScoreMatrix:
    """Scores of ``K`` algorithms × ``N`` cases for one organ and one metric of one test set.

    Attributes:
      organ: organ name (or ``"average"``).
      metric: metric name, e.g. ``"dsc"``.
      algorithms: the ``K`` algorithm names (row order), unique.
      case_ids: the ``N`` case ids (column order), unique.
      values: ``(K, N)`` float64, read-only; ``NaN`` = not scored.
      failed: ``(K, N)`` bool, read-only; True where the score is the worst value given to a
        failed/invalid prediction. All False when not given.
      higher_is_better: direction of the metric.
    """

    organ: str
    metric: str
    algorithms: tuple[str, ...]
    case_ids: tuple[str, ...]
    values: np.ndarray
    failed: np.ndarray = field(default=None)  # type: ignore[assignment]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        algorithms = tuple(str(a) for a in self.algorithms)
        case_ids = tuple(str(c) for c in self.case_ids)
        values = np.array(self.values, dtype=np.float64, copy=True)
        if values.ndim != 2 or values.shape != (len(algorithms), len(case_ids)):
            raise ValueError(
                f"values must have shape (algorithms, cases) = ({len(algorithms)}, "
                f"{len(case_ids)}), got {values.shape}"
            )
        for what, names in (("algorithm", algorithms), ("case id", case_ids)):
            if len(set(names)) != len(names):
                dupes = sorted({n for n in names if names.count(n) > 1})[:5]
                raise ValueError(f"duplicate {what}s {dupes}: each must appear once")
        if self.failed is None:
            failed = np.zeros(values.shape, dtype=bool)
        else:
            failed = np.array(self.failed, dtype=bool, copy=True)
            if failed.shape != values.shape:
                raise ValueError(f"failed must have shape {values.shape}, got {failed.shape}")
        values.flags.writeable = False
        failed.flags.writeable = False
        object.__setattr__(self, "algorithms", algorithms)
        object.__setattr__(self, "case_ids", case_ids)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "failed", failed)
        object.__setattr__(self, "higher_is_better", bool(self.higher_is_better))

    @property
    def n_algorithms(self) -> int:
        return len(self.algorithms)

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)

    @property
    def scored(self) -> np.ndarray:
        """``(K, N)`` bool: True where a score exists."""
        return ~np.isnan(self.values)

    @property
    def sign(self) -> float:
        """``+1`` when higher is better, ``-1`` otherwise."""
        return 1.0 if self.higher_is_better else -1.0

    def oriented(self) -> np.ndarray:
        """Scores times :attr:`sign`: larger is always better. ``NaN`` stays ``NaN``."""
        return self.values * self.sign

    def select(
        self, algorithms: Sequence[str] | None = None, case_ids: Sequence[str] | None = None
    ) -> ScoreMatrix:
        """A new matrix restricted to (and ordered by) the given algorithms and/or cases."""
        rows = _positions(self.algorithms, algorithms, "algorithm")
        cols = _positions(self.case_ids, case_ids, "case id")
        return ScoreMatrix(
            organ=self.organ,
            metric=self.metric,
            algorithms=tuple(self.algorithms[i] for i in rows),
            case_ids=tuple(self.case_ids[j] for j in cols),
            values=self.values[np.ix_(rows, cols)],
            failed=self.failed[np.ix_(rows, cols)],
            higher_is_better=self.higher_is_better,
        )

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per (algorithm, case_id) with columns organ, metric, value, failed."""
        k, n = self.values.shape
        return pd.DataFrame(
            {
                "algorithm": np.repeat(np.array(self.algorithms, dtype=object), n),
                "case_id": np.tile(np.array(self.case_ids, dtype=object), k),
                "organ": self.organ,
                "metric": self.metric,
                "value": self.values.ravel(),
                "failed": self.failed.ravel(),
            }
        )


def _positions(names: tuple[str, ...], wanted: Sequence[str] | None, what: str) -> np.ndarray:
    if wanted is None:
        return np.arange(len(names))
    index = {n: i for i, n in enumerate(names)}
    missing = [w for w in wanted if str(w) not in index]
    if missing:
        raise KeyError(f"unknown {what}(s) {missing[:5]}; known: {list(names)[:10]}...")
    return np.array([index[str(w)] for w in wanted], dtype=np.intp)


def score_matrices_from_long(
    scores: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    organs: Sequence[str] | None = None,
    algorithms: Sequence[str] | None = None,
    case_metadata: pd.DataFrame | None = None,
    higher_is_better_overrides: Mapping[str, bool] | None = None,
) -> dict[tuple[str, str], ScoreMatrix]:
    """Build one :class:`ScoreMatrix` per (organ, metric) from a long score table.

    Args:
      scores: one row per (algorithm, case_id, organ) with one column per metric (``dsc``,
        ``nsd``, ...); an optional bool column ``failed`` marks worst-value scores of failed
        predictions. An absent row or a ``NaN`` cell means not scored.
      metrics: metric columns to use; default: every column of :data:`HIGHER_IS_BETTER` present.
      organs: organ order; default: :data:`evaluation.labels.ORGANS` present in ``scores``, then
        any other organ names sorted.
      algorithms: algorithm (row) order; default: sorted unique names.
      case_metadata: the test set's case table (column ``case_id``, plus any metadata). When
        given it fixes the case axis (its row order) so that cases nobody scored still count as
        missing; a score for a case absent from it is an error.
      higher_is_better_overrides: direction of metrics not in :data:`HIGHER_IS_BETTER`.

    Returns:
      ``{(organ, metric): ScoreMatrix}``.
    """
    required = {"algorithm", "case_id", "organ"}
    absent = required - set(scores.columns)
    if absent:
        raise ValueError(
            f"score table lacks column(s) {sorted(absent)}; it needs algorithm, case_id, organ "
            f"and one column per metric (e.g. dsc, nsd)"
        )
    if metrics is None:
        metrics = [m for m in HIGHER_IS_BETTER if m in scores.columns]
        if not metrics:
            raise ValueError(
                f"score table has no metric column; expected some of {sorted(HIGHER_IS_BETTER)} "
                f"or pass metrics=[...]"
            )
    else:
        absent = [m for m in metrics if m not in scores.columns]
        if absent:
            raise ValueError(f"score table lacks metric column(s) {absent}")
    directions = {m: higher_is_better(m, higher_is_better_overrides) for m in metrics}

    frame = scores.copy()
    for col in ("algorithm", "case_id", "organ"):
        frame[col] = frame[col].astype(str)
    dupes = frame.duplicated(["algorithm", "case_id", "organ"], keep=False)
    if dupes.any():
        example = frame.loc[dupes, ["algorithm", "case_id", "organ"]].head(3).to_dict("records")
        raise ValueError(f"score table has duplicate (algorithm, case_id, organ) rows, e.g. {example}")

    if case_metadata is not None:
        if "case_id" not in case_metadata.columns:
            raise ValueError("case_metadata needs a case_id column")
        case_ids = [str(c) for c in case_metadata["case_id"]]
        if len(set(case_ids)) != len(case_ids):
            raise ValueError("case_metadata has duplicate case_id values")
        unknown = sorted(set(frame["case_id"]) - set(case_ids))
        if unknown:
            raise ValueError(
                f"{len(unknown)} scored case(s) are not in case_metadata, e.g. {unknown[:5]}; "
                f"add them to the test set's cases or drop those scores"
            )
    else:
        case_ids = sorted(frame["case_id"].unique())
    if algorithms is None:
        algorithms = sorted(frame["algorithm"].unique())
    else:
        algorithms = [str(a) for a in algorithms]
    present = set(frame["organ"].unique())
    if organs is None:
        organs = [o for o in ORGANS if o in present] + sorted(present - set(ORGANS))

    failed_col = "failed" in frame.columns
    if failed_col:  # bool flag; an empty cell means not failed
        frame["failed_flag"] = [1.0 if (pd.notna(v) and bool(v)) else 0.0 for v in frame["failed"]]
    out: dict[tuple[str, str], ScoreMatrix] = {}
    for organ in organs:
        part = frame[frame["organ"] == organ]
        for metric in metrics:
            values = (
                part.pivot(index="algorithm", columns="case_id", values=metric)
                .reindex(index=algorithms, columns=case_ids)
                .to_numpy(dtype=np.float64)
            )
            failed = None
            if failed_col:
                flags = (
                    part.pivot(index="algorithm", columns="case_id", values="failed_flag")
                    .reindex(index=algorithms, columns=case_ids)
                    .to_numpy(dtype=np.float64)
                )
                failed = np.nan_to_num(flags, nan=0.0) > 0
            out[(organ, metric)] = ScoreMatrix(
                organ=organ,
                metric=metric,
                algorithms=tuple(algorithms),
                case_ids=tuple(case_ids),
                values=values,
                failed=failed,
                higher_is_better=directions[metric],
            )
    return out


#: organ-average rules (a protocol's ``organ_average``)
ORGAN_AVERAGE_RULES = ("scored-organs", "all-organs")
#: missing-case policies of a test set (see :func:`apply_missing_policy`)
MISSING_POLICIES = ("worst", "common")


def average_over_organs(matrices: Iterable[ScoreMatrix], rule: str = "scored-organs") -> ScoreMatrix:
    """Per-case mean over organs.

    ``rule="scored-organs"``: ``avg[k, j]`` is the mean over the organs that ``k`` has a score for
    in case ``j`` (not scored only when no organ is). ``rule="all-organs"`` (Touchstone's
    leaderboard, pandas ``mean(axis=1, skipna=False)``): a case counts only when ``k`` has a score
    for every organ present in that case's ground truth -- the organs some algorithm of the matrices
    scored for ``j``; otherwise ``avg[k, j]`` is not scored. All matrices must share metric,
    algorithms and case ids; ``failed`` is True when any organ's score is a failure.
    """
    if rule not in ORGAN_AVERAGE_RULES:
        raise ValueError(f"unknown organ-average rule {rule!r}; choose one of {list(ORGAN_AVERAGE_RULES)}")
    matrices = list(matrices)
    if not matrices:
        raise ValueError("average_over_organs needs at least one score matrix")
    first = matrices[0]
    for m in matrices[1:]:
        if (m.metric, m.algorithms, m.case_ids) != (first.metric, first.algorithms, first.case_ids):
            raise ValueError(
                "average_over_organs needs matrices with the same metric, algorithms and cases "
                f"({m.organ} differs from {first.organ})"
            )
    stack = np.stack([m.values for m in matrices])  # (O, K, N)
    scored = ~np.isnan(stack)
    counts = scored.sum(axis=0)
    sums = np.nansum(stack, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    if rule == "all-organs":
        present = scored.any(axis=1, keepdims=True)  # (O, 1, N): organ in the case's ground truth
        complete = (scored | ~present).all(axis=0)  # (K, N)
        avg = np.where(complete, avg, np.nan)
    failed = np.stack([m.failed for m in matrices]).any(axis=0)
    return ScoreMatrix(
        organ=AVERAGE_ORGAN,
        metric=first.metric,
        algorithms=first.algorithms,
        case_ids=first.case_ids,
        values=avg,
        failed=failed,
        higher_is_better=first.higher_is_better,
    )


def expected_cases(scores: ScoreMatrix) -> np.ndarray:
    """``(N,)`` bool: the cases some algorithm has a score for (a case nobody scored, e.g. an organ
    absent from the ground truth, is not part of the comparison)."""
    return scores.scored.any(axis=0)


def apply_missing_policy(
    scores: ScoreMatrix, policy: str, *, worst: float | None = None, expected: np.ndarray | None = None
) -> ScoreMatrix:
    """The matrix a missing-case policy compares on (only cases in ``expected`` are kept; default:
    :func:`expected_cases`).

    ``"worst"``: every missing score of an expected case becomes ``worst`` (the protocol's worst
    value of the metric, e.g. DSC 0), marked ``failed``. ``"common"``: only the cases every
    algorithm of the matrix has a score for.
    """
    if policy not in MISSING_POLICIES:
        raise ValueError(f"unknown missing-case policy {policy!r}; choose one of {list(MISSING_POLICIES)}")
    keep = expected_cases(scores) if expected is None else np.asarray(expected, dtype=bool)
    if policy == "common":
        keep = keep & scores.scored.all(axis=0)
        cols = np.flatnonzero(keep)
        return scores.select(case_ids=[scores.case_ids[j] for j in cols])
    if worst is None:
        raise ValueError("the 'worst' missing-case policy needs the protocol's worst value")
    cols = np.flatnonzero(keep)
    values = scores.values[:, cols]
    missing = np.isnan(values)
    return ScoreMatrix(
        organ=scores.organ,
        metric=scores.metric,
        algorithms=scores.algorithms,
        case_ids=tuple(scores.case_ids[j] for j in cols),
        values=np.where(missing, float(worst), values),
        failed=scores.failed[:, cols] | missing,
        higher_is_better=scores.higher_is_better,
    )


def json_ready(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and NaN/inf to plain JSON types (NaN, ±inf -> None)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, pd.DataFrame):
        return [json_ready(r) for r in value.to_dict(orient="records")]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is pd.NA or value is None:
        return None
    return value
