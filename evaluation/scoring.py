"""Per-case scoring glue: read a prediction and its ground truth, score every organ, never raise for
a bad prediction.

``score_case`` is what the Celery ``score`` task and ``touchstone evaluate`` call. It turns every
problem with a *prediction* into rows carrying the protocol's worst values and a status
(:class:`evaluation.io.ScoreStatus`); a problem with the *ground truth* is the organizer's and raises
:class:`evaluation.io.GroundTruthError` (it must be fixed, not scored against a submission).

Granularity: in the ``masks`` layout each organ file stands alone, so a refused organ file scores
only that organ worst; a missing organ file is an empty mask (scored by the protocol's empty-mask
rules, status ``ok``, the detail says so). In the ``combined`` layout one bad file makes the whole
case worst.

Lesion protocols (``kind: lesion``) go through the same path: the label table is the protocol's
``labels`` (organs and lesion classes); every class gets the organ metrics on its whole mask
(:mod:`evaluation.metrics`), and each lesion class row also carries the lesion metrics and the
per-lesion records of :mod:`evaluation.lesions` (``ScoreRow.lesion_metrics``, ``ScoreRow.lesions``).
A failed prediction gives a lesion class the protocol's ``worst`` lesion values and no records.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evaluation.io import (
    STATUS_MISSING_PREDICTION,
    STATUS_OK,
    STATUS_TOO_LARGE,
    CaseError,
    ScoreStatus,
    GeometryTolerance,
    GroundTruthError,
    ReadLimits,
    read_labels,
)
from evaluation.lesions import Lesion, evaluate_lesions
from evaluation.metric_registry import ORGAN_METRICS
from evaluation.metrics import compute_case_metrics
from evaluation.protocols import Protocol, load_protocol


@dataclass(frozen=True)
class ScoreRow:
    """One organ (or lesion class) of one case. A metric the protocol does not compute is ``None``;
    ``detail`` says why a row is not ``ok`` (or notes such as "no mask file; scored as empty").

    ``lesion_metrics``: lesion metric → value, for a lesion class of a lesion protocol (empty for
    organs); ``lesions``: its per-lesion records (:class:`evaluation.lesions.Lesion`: truth
    components, then predicted ones; empty when the prediction failed)."""

    case_id: str
    organ: str
    dsc: float | None
    nsd: float | None
    hd95: float | None
    assd: float | None
    status: str  # a ScoreStatus value (stored as the plain string)
    detail: str = ""
    lesion_metrics: dict[str, float] = field(default_factory=dict)
    lesions: tuple[Lesion, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", str(ScoreStatus(self.status)))

    def value(self, metric: str) -> float | None:
        """The value of any metric of :mod:`evaluation.metric_registry` (``None``: not computed)."""
        if metric in ORGAN_METRICS:
            return getattr(self, metric)
        return self.lesion_metrics.get(metric)

    @property
    def failed(self) -> bool:
        """A failed prediction (any status but ``ok``): scored worst, counted in ``n_failed``."""
        return ScoreStatus(self.status).is_failure

    def as_dict(self) -> dict[str, object]:
        """Plain data; ``lesion_metrics`` and ``lesions`` (as dicts) only on a lesion class's row."""
        data = asdict(self)
        if not self.lesion_metrics and not self.lesions:
            del data["lesion_metrics"], data["lesions"]
        return data


@dataclass(frozen=True)
class CaseToScore:
    """A case for :func:`score_cases`: its id, ground-truth labels path, prediction folder (or None)."""

    case_id: str
    gt: Path
    pred: Path | None


def worst_rows(case_id: str, protocol: Protocol, status: str, detail: str, organs: Iterable[str] | None = None) -> list[ScoreRow]:
    """Rows with the protocol's worst value of every metric it computes (``None`` for the others)."""
    return [_worst_row(case_id, organ, protocol, status, detail) for organ in (organs or protocol.classes)]


def _worst_row(case_id: str, organ: str, protocol: Protocol, status: str, detail: str) -> ScoreRow:
    values = {m: (float(protocol.worst[m]) if m in protocol.metrics else None) for m in ORGAN_METRICS}
    lesion = {m: float(protocol.worst[m]) for m in protocol.lesion_metrics} if organ in protocol.lesions else {}
    return ScoreRow(case_id=case_id, organ=organ, status=status, detail=detail, lesion_metrics=lesion, **values)


def _class_mask(labels: np.ndarray | dict[str, np.ndarray] | None, name: str, label_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """The boolean mask of one class from a label map or a per-class mapping (absent: empty)."""
    if isinstance(labels, np.ndarray):
        return labels == label_id
    mask = None if labels is None else labels.get(name)
    return np.zeros(shape, np.bool_) if mask is None else np.asarray(mask, dtype=np.bool_)


def score_case(
    case_id: str,
    gt_case_dir: Path | str,
    pred_case_dir: Path | str | None,
    protocol: Protocol | str,
    limits: ReadLimits | None = None,
    *,
    tolerance: GeometryTolerance = GeometryTolerance(),
    device: str = "cpu",
) -> list[ScoreRow]:
    """Score one case: one :class:`ScoreRow` per class of the protocol (its organs, then its lesion
    classes), in the protocol's order.

    ``gt_case_dir``: the ground truth (a case folder, a ``segmentations`` folder or a label file).
    ``pred_case_dir``: the prediction's case folder (or None / not existing: ``missing_prediction``).
    Never raises for a bad prediction; raises :class:`GroundTruthError` for unusable ground truth.
    Spacing for the surface metrics is the ground truth's (mm, from its affine).
    ``device``: "cpu" (numpy, the default) or a torch device such as "cuda" / "cuda:1" for the
    optional GPU path (:mod:`evaluation.gpu`, same values; raises ``GpuUnavailableError`` when torch
    or the device is missing).
    """
    protocol = load_protocol(protocol)
    organs = protocol.labels
    try:
        gt = read_labels(gt_case_dir, organs, untrusted=False)
    except CaseError as exc:
        raise GroundTruthError(case_id, exc) from None

    if pred_case_dir is None or not os.path.lexists(pred_case_dir):
        return worst_rows(case_id, protocol, STATUS_MISSING_PREDICTION, f"no prediction folder for case {case_id!r}")
    try:
        pred = read_labels(
            pred_case_dir, organs, limits=limits or ReadLimits(), untrusted=True, reference=gt.geometry,
            tolerance=tolerance, collect_organ_errors=True,
        )
    except CaseError as exc:
        return worst_rows(case_id, protocol, exc.status, str(exc))
    except MemoryError:
        return worst_rows(case_id, protocol, STATUS_TOO_LARGE, "not enough memory to read the prediction; write uint8 labels")

    try:
        masks = protocol.mask_protocol
        if device == "cpu":
            values = compute_case_metrics(pred.metrics_input(), gt.metrics_input(), gt.geometry.spacing, masks)
        else:
            from evaluation.gpu import compute_case_metrics as compute_on_device

            values = compute_on_device(pred.metrics_input(), gt.metrics_input(), gt.geometry.spacing, masks, device=device)
        lesion_results = {}
        if protocol.lesions:
            matching = protocol.lesion_matching.to_matching()
            for name, label_id in protocol.lesions.items():
                if name in pred.organ_errors:
                    continue
                lesion_results[name] = evaluate_lesions(
                    _class_mask(pred.metrics_input(), name, label_id, gt.geometry.shape),
                    _class_mask(gt.metrics_input(), name, label_id, gt.geometry.shape),
                    gt.geometry.spacing, matching,
                )
    except MemoryError:
        return worst_rows(case_id, protocol, STATUS_TOO_LARGE, "not enough memory to score the prediction")
    rows = []
    for organ in organs:
        if organ in pred.organ_errors:
            err = pred.organ_errors[organ]
            rows.append(_worst_row(case_id, organ, protocol, err.status, str(err)))
            continue
        detail = f"no mask file for {organ}; scored as an empty mask" if organ in pred.missing_organs else ""
        got = values[organ]
        lesion = lesion_results.get(organ)
        rows.append(
            ScoreRow(
                case_id=case_id,
                organ=organ,
                status=STATUS_OK,
                detail=detail,
                lesion_metrics={m: float(lesion.metrics[m]) for m in protocol.lesion_metrics} if lesion else {},
                lesions=lesion.lesions if lesion else (),
                **{m: (float(got[m]) if m in protocol.metrics else None) for m in ORGAN_METRICS},
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Many cases, several processes
# --------------------------------------------------------------------------------------------------

_worker_state: dict[str, object] = {}


def _init_worker(protocol: Protocol, limits: ReadLimits | None, tolerance: GeometryTolerance, device: str) -> None:
    _worker_state.update(protocol=protocol, limits=limits, tolerance=tolerance, device=device)


def _score_in_worker(case: CaseToScore) -> list[ScoreRow]:
    return score_case(
        case.case_id, case.gt, case.pred, _worker_state["protocol"], _worker_state["limits"],  # type: ignore[arg-type]
        tolerance=_worker_state["tolerance"], device=_worker_state["device"],  # type: ignore[arg-type]
    )


def _pool_context():
    """``fork`` when this process runs a single thread (workers start at once, modules already
    imported); otherwise ``forkserver`` (workers fork from a clean server process that imported
    the modules once), because forking a process with other threads can deadlock the child."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["evaluation.scoring"])
        return ctx
    return multiprocessing.get_context()


def score_cases(
    cases: Sequence[CaseToScore | tuple[str, Path | str, Path | str | None]],
    protocol: Protocol | str,
    limits: ReadLimits | None = None,
    *,
    workers: int = 1,
    progress: Callable[[str, list[ScoreRow]], None] | None = None,
    tolerance: GeometryTolerance = GeometryTolerance(),
    device: str = "cpu",
) -> list[ScoreRow]:
    """Score many cases, with ``workers`` processes (1: in this process); ``device`` as in
    :func:`score_case`.

    Rows come back in the order of ``cases``, then of the protocol's classes, whatever order the
    workers finish in. ``progress(case_id, rows)`` is called in this process as each case finishes.
    A :class:`GroundTruthError` stops the run (pending cases are cancelled) and is raised.
    """
    protocol = load_protocol(protocol)
    todo = [c if isinstance(c, CaseToScore) else CaseToScore(c[0], Path(c[1]), None if c[2] is None else Path(c[2])) for c in cases]
    results: list[list[ScoreRow] | None] = [None] * len(todo)
    if workers <= 1 or len(todo) <= 1:
        for i, case in enumerate(todo):
            results[i] = score_case(case.case_id, case.gt, case.pred, protocol, limits, tolerance=tolerance, device=device)
            if progress is not None:
                progress(case.case_id, results[i])  # type: ignore[arg-type]
    else:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=_pool_context(),
            initializer=_init_worker, initargs=(protocol, limits, tolerance, device),
        ) as pool:
            futures = {pool.submit(_score_in_worker, case): i for i, case in enumerate(todo)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        for other in pending:
                            other.cancel()
                        raise exc
                    i = futures[fut]
                    results[i] = fut.result()
                    if progress is not None:
                        progress(todo[i].case_id, results[i])  # type: ignore[arg-type]
    return [row for rows in results for row in rows or ()]


def summarize(rows: Iterable[ScoreRow], protocol: Protocol) -> list[dict[str, object]]:
    """Per class (protocol order): number of cases, mean of each computed metric over all rows (bad
    predictions included at their worst value; NaN values -- an undefined metric -- left out), and
    how many rows are not ``ok``. Lesion metrics appear for lesion classes only; the mean of
    ``lesion_fp`` is the number of false positives per case."""
    by_organ: dict[str, list[ScoreRow]] = {o: [] for o in protocol.classes}
    for r in rows:
        by_organ.setdefault(r.organ, []).append(r)
    out = []
    for organ, rs in by_organ.items():
        entry: dict[str, object] = {"organ": organ, "cases": len(rs), "not_ok": sum(r.status != STATUS_OK for r in rs)}
        for m in protocol.metrics:
            if m not in ORGAN_METRICS and organ not in protocol.lesions:
                continue
            got = [r.value(m) for r in rs]
            vals = [v for v in got if v is not None and not math.isnan(v)]
            entry[f"mean_{m}"] = (sum(vals) / len(vals)) if vals else float("nan")
        out.append(entry)
    return out
