"""Prediction retention and re-scoring under another protocol version (the domain layer: the CLI,
the API and the worker call these; docs/operations.md "Storage, retention and re-scoring").

*Retention.* The valid predictions of every run stay in storage (``<storage>/runs/submission-<id>/``,
see docs/execution.md) so a submission can be scored again without running its container. How long
is a setting of the test set, ``TestSet.prediction_retention_days``: ``None`` keeps them all, ``0``
keeps none, ``N`` keeps them N days after the submission was scored. The worker's
``touchstone.reclaim_predictions`` task (``touchstone storage reclaim``, and every
``reap_interval_s`` by the embedded beat) deletes what the retention no longer covers -- never the
predictions of a submission a re-scoring job still has to read -- and stamps
``Submission.predictions_deleted_at``.

*Re-scoring.* :func:`start_rescore` registers a protocol version (a preset, ``name@version`` or a
protocol file; through the API only inside ``TOUCHSTONE_IMPORT_ROOTS``) as a
:class:`~services.db.models.TestSetProtocol` of the test set, checks which submissions still hold
every prediction (the others are *reported* in ``RescoreJob.unavailable`` with the reason), and
queues ``touchstone.rescore`` on the cpu queue. The worker (``worker/rescoring.py``) scores the
kept files of the hidden cases (the benchmark's; the public sample's validation scores, the
inventors' own feedback, stay under the version they were made with) through
:mod:`evaluation.scoring`, as the scoring step does, writes ``Score`` rows under the new key (the old
version's rows stay) and computes the statistics of that version; no container runs. The job's
counters are its progress.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.audit import audit
from services.config import Settings, get_settings
from services.db.base import utcnow
from services.db.enums import RescoreState, SubmissionState
from services.db.models import Case, CaseRun, RescoreJob, Submission, TestSet, TestSetProtocol, User
from services.db.states import rescore_transition
from services.storage import Storage, StorageError

#: the Celery task names (services never import the worker: work is sent by name)
RESCORE_TASK = "touchstone.rescore"
RECLAIM_TASK = "touchstone.reclaim_predictions"
CPU_QUEUE = "cpu"
#: the submissions that hold predictions (scored under the test set's protocol)
RESCORABLE_STATES = (SubmissionState.scored, SubmissionState.published)
#: the largest retention accepted (days)
MAX_RETENTION_DAYS = 36_500


class RescoringError(ValueError):
    """A retention setting or re-scoring request that cannot be applied; ``status`` is the HTTP
    status the API answers (the message names the problem and the fix)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# retention
# --------------------------------------------------------------------------------------------
_DAYS = re.compile(r"^\s*(\d{1,6})\s*(d|day|days)?\s*$", re.IGNORECASE)


def parse_retention(value: str | int | None) -> int | None:
    """``"all"`` (or ``None``) → ``None`` (keep every prediction), ``"none"`` → ``0``, ``N``,
    ``"N"``, ``"Nd"``, ``"N days"`` → ``N``; :class:`RescoringError` for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RescoringError(f"prediction retention must be 'all', 'none' or a number of days, got {value!r}")
    if isinstance(value, int):
        days = value
    else:
        text = str(value).strip().lower()
        if text in ("all", "keep-all", "forever"):
            return None
        if text in ("none", "keep-none", "0"):
            return 0
        match = _DAYS.match(text)
        if match is None:
            shown = text if len(text) <= 50 else text[:50] + "..."
            raise RescoringError(f"prediction retention must be 'all', 'none' or a number of days such as '30d', "
                                 f"got {shown!r}")
        days = int(match.group(1))
    if not 0 <= days <= MAX_RETENTION_DAYS:
        raise RescoringError(f"prediction retention must be between 0 and {MAX_RETENTION_DAYS} days, got {days}")
    return days


def describe_retention(days: int | None) -> str:
    """The retention in words (what the CLI and the docs print)."""
    if days is None:
        return "keep all predictions"
    if days == 0:
        return "keep no predictions (deleted once scored)"
    return f"keep predictions {days} day{'s' if days != 1 else ''} after scoring"


def set_prediction_retention(session: Session, testset: TestSet, value: str | int | None,
                             actor: User | None = None) -> int | None:
    """Set the test set's retention (see :func:`parse_retention`); returns the stored days. The
    caller commits. Predictions already deleted stay deleted; longer retention keeps the rest."""
    days = parse_retention(value)
    testset.prediction_retention_days = days
    audit(session, actor, "testset.retention", f"testset:{testset.id}",
          {"prediction_retention_days": days, "means": describe_retention(days)})
    session.flush()
    return days


def retention_expired(days: int | None, scored_at: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether predictions of a submission scored at ``scored_at`` are past a retention of
    ``days`` at ``now`` (``None`` never expires; ``0`` expires as soon as it is scored)."""
    if days is None or scored_at is None:
        return False
    if scored_at.tzinfo is None:
        scored_at = scored_at.replace(tzinfo=dt.timezone.utc)
    return now >= scored_at + dt.timedelta(days=days)


def active_job_submissions(session: Session) -> set[int]:
    """Submissions a queued or running re-scoring job still has to read (never reclaimed)."""
    ids: set[int] = set()
    for listed in session.scalars(sa.select(RescoreJob.submission_ids).where(
            RescoreJob.state.in_([RescoreState.queued, RescoreState.running]))):
        ids.update(int(i) for i in listed or [])
    return ids


def reclaimable_submissions(session: Session, now: dt.datetime | None = None,
                            testset_id: int | None = None) -> list[int]:
    """Ids of the scored or published submissions whose predictions the retention of their test
    set no longer covers at ``now`` and that no active re-scoring job needs (ascending)."""
    now = now or utcnow()
    query = (sa.select(Submission.id, Submission.scored_at, TestSet.prediction_retention_days)
             .join(TestSet, TestSet.id == Submission.testset_id)
             .where(Submission.state.in_(RESCORABLE_STATES), Submission.predictions_deleted_at.is_(None),
                    Submission.is_baseline.is_(False), TestSet.prediction_retention_days.is_not(None)))
    if testset_id is not None:
        query = query.where(Submission.testset_id == testset_id)
    busy = active_job_submissions(session)
    return sorted(sid for sid, scored_at, days in session.execute(query)
                  if sid not in busy and retention_expired(days, scored_at, now))


def _tarball_bytes(storage: Storage, image_path: str | None) -> int:
    if not image_path:
        return 0
    try:
        return storage.path(image_path).stat().st_size
    except (OSError, StorageError):
        return 0


def storage_report(session: Session, settings: Settings | None = None, now: dt.datetime | None = None,
                   testset_name: str | None = None) -> list[dict[str, Any]]:
    """Per test set: its retention, and per scored/published submission what it holds in storage
    (``storage_bytes`` as the worker recorded it: tarball + kept predictions; the tarball's size
    from disk, the predictions' the difference), whether its predictions are kept, deleted or
    reclaimable now."""
    settings = settings or get_settings()
    storage = Storage.from_settings(settings)
    now = now or utcnow()
    query = sa.select(TestSet).order_by(TestSet.name)
    if testset_name is not None:
        query = query.where(TestSet.name == testset_name)
    testsets = list(session.scalars(query))
    if testset_name is not None and not testsets:
        raise RescoringError(f"no test set named {testset_name!r}", 404)
    busy = active_job_submissions(session)
    out = []
    for ts in testsets:
        rows = []
        for sub in session.scalars(sa.select(Submission).where(
                Submission.testset_id == ts.id, Submission.state.in_(RESCORABLE_STATES)).order_by(Submission.id)):
            tarball = _tarball_bytes(storage, sub.image_path)
            predictions = 0 if sub.predictions_deleted_at else max(0, int(sub.storage_bytes or 0) - tarball)
            if sub.is_baseline:
                status = "imported (no predictions)"
            elif sub.predictions_deleted_at is not None:
                status = "deleted"
            elif retention_expired(ts.prediction_retention_days, sub.scored_at, now):
                status = "kept for a re-scoring job" if sub.id in busy else "reclaimable"
            else:
                status = "kept"
            rows.append({"submission_id": sub.id, "state": sub.state.value, "scored_at": sub.scored_at,
                         "tarball_bytes": tarball, "prediction_bytes": predictions, "predictions": status,
                         "predictions_deleted_at": sub.predictions_deleted_at})
        out.append({"testset": ts.name, "prediction_retention_days": ts.prediction_retention_days,
                    "retention": describe_retention(ts.prediction_retention_days),
                    "submissions": rows,
                    "prediction_bytes": sum(r["prediction_bytes"] for r in rows),
                    "reclaimable_bytes": sum(r["prediction_bytes"] for r in rows if r["predictions"] == "reclaimable"),
                    "tarball_bytes": sum(r["tarball_bytes"] for r in rows)})
    return out


def enqueue_reclaim(submission_ids: list[int] | None = None) -> None:
    """Ask a cpu worker to delete the predictions the retention no longer covers (all, or only
    ``submission_ids`` among them)."""
    from services import queue

    queue.send_task(RECLAIM_TASK, args=[submission_ids], queue=CPU_QUEUE)


# --------------------------------------------------------------------------------------------
# which submissions can be re-scored
# --------------------------------------------------------------------------------------------
def prediction_items(session: Session, submission: Submission, settings: Settings | None = None
                     ) -> tuple[list[dict[str, Any]], str | None]:
    """(items, reason): one item per hidden case of the submission -- ``case_pk``, ``case_id``,
    ``prediction`` (its folder relative to storage, for a case whose run produced a valid one;
    else None) and ``run_status`` -- or the reason it cannot be re-scored (its predictions or
    its run records are gone; imported results never had any)."""
    if submission.is_baseline:
        return [], "imported results (never run here): there are no predictions to score"
    if submission.state not in RESCORABLE_STATES:
        return [], f"it is {submission.state.value}: only scored or published submissions are re-scored"
    if submission.predictions_deleted_at is not None:
        retention = describe_retention(submission.testset.prediction_retention_days)
        return [], (f"its predictions were deleted on {submission.predictions_deleted_at:%Y-%m-%d %H:%M} UTC "
                    f"under the test set's retention ({retention}); run it again to re-score it")
    storage = Storage.from_settings(settings or get_settings())
    cases = list(session.execute(
        sa.select(Case.id, Case.case_id).where(Case.testset_id == submission.testset_id,
                                               Case.public_sample.is_(False)).order_by(Case.id)))
    runs = {r.case_id: r for r in session.scalars(sa.select(CaseRun).where(CaseRun.submission_id == submission.id))}
    items, no_run, gone = [], [], []
    for case_pk, case_id in cases:
        run = runs.get(case_pk)
        if run is None:
            no_run.append(case_id)
            continue
        prediction = None
        if run.status == "ok":
            try:
                folder = storage.path(run.detail or "")
            except StorageError:
                folder = None
            if folder is None or not folder.is_dir():
                gone.append(case_id)
                continue
            prediction = run.detail
        items.append({"case_pk": case_pk, "case_id": case_id, "prediction": prediction, "run_status": run.status})
    if no_run:
        return [], f"no run record of {len(no_run)} of its {len(cases)} hidden case(s)"
    if gone:
        return [], (f"the predictions of {len(gone)} of its {len(cases)} hidden case(s) are gone from storage "
                    f"(e.g. case {gone[0]!r}); run it again to re-score it")
    return items, None


# --------------------------------------------------------------------------------------------
# protocol versions
# --------------------------------------------------------------------------------------------
def register_protocol(session: Session, testset: TestSet, spec: str, *, settings: Settings | None = None,
                      confine: bool = False, actor: User | None = None) -> TestSetProtocol:
    """The :class:`TestSetProtocol` of ``spec`` (a preset, ``name@version`` or a protocol file --
    with ``confine``, the API's, a file only inside the import roots) for ``testset``, created if
    new. Refused: the test set's current version (it is scored already), and a key that the test
    set knows with another description (a changed protocol is a new version)."""
    from evaluation.protocols import Protocol
    from services.db.testsets import ManifestError, confined_protocol, resolve_protocol

    settings = settings or get_settings()
    if not spec or not str(spec).strip():
        raise RescoringError("give the protocol to re-score under: a preset, NAME@VERSION or a protocol file")
    try:
        if confine:
            spec = confined_protocol(str(spec), settings) or ""
        name, version, as_json = resolve_protocol(str(spec))
        content_hash = Protocol.from_dict(as_json).content_hash
    except ManifestError as exc:
        raise RescoringError(str(exc)) from None
    except ValueError as exc:  # the stored JSON form did not read back (should not happen)
        raise RescoringError(f"the protocol cannot be used: {exc}") from None
    key = f"{name}@{version}"
    if key == testset.protocol_key:
        try:
            same = Protocol.from_dict(testset.protocol_json).content_hash == content_hash
        except ValueError:
            same = False
        if same:
            raise RescoringError(f"test set {testset.name!r} is scored under {key} already; give another protocol "
                                 "version (a protocol file with a higher version)", 409)
        raise RescoringError(f"the protocol given is named {key} but differs from the test set's {key}: a changed "
                             "protocol is a new version; raise 'version' in the file", 409)
    existing = session.scalar(sa.select(TestSetProtocol).where(TestSetProtocol.testset_id == testset.id,
                                                               TestSetProtocol.protocol_key == key))
    if existing is not None:
        if existing.content_hash != content_hash:
            raise RescoringError(f"test set {testset.name!r} already has scores under {key} made with another "
                                 "description of it: a changed protocol is a new version; raise 'version' in the file",
                                 409)
        return existing
    row = TestSetProtocol(testset_id=testset.id, protocol_key=key, protocol_json=as_json, content_hash=content_hash,
                          created_by_id=actor.id if actor else None)
    session.add(row)
    session.flush()
    return row


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
def start_rescore(session: Session, testset: TestSet, protocol: str, *, submission_ids: list[int] | None = None,
                  settings: Settings | None = None, confine: bool = False, actor: User | None = None) -> RescoreJob:
    """Create the re-scoring job of ``testset`` under ``protocol`` for ``submission_ids`` (default:
    every scored or published submission). The submissions that cannot be re-scored are listed in
    ``unavailable`` with the reason. The caller commits, then calls :func:`enqueue_rescore`
    (a job with nothing to score is ``done`` at once)."""
    settings = settings or get_settings()
    version = register_protocol(session, testset, protocol, settings=settings, confine=confine, actor=actor)
    if submission_ids:
        wanted = sorted({int(i) for i in submission_ids})
        found = {s.id: s for s in session.scalars(sa.select(Submission).where(
            Submission.id.in_(wanted), Submission.testset_id == testset.id))}
        unknown = [i for i in wanted if i not in found]
        if unknown:
            raise RescoringError(f"no submission {', '.join(map(str, unknown))} on test set {testset.name!r}", 404)
        candidates = [found[i] for i in wanted]
    else:
        candidates = list(session.scalars(sa.select(Submission).where(
            Submission.testset_id == testset.id, Submission.state.in_(RESCORABLE_STATES)).order_by(Submission.id)))
    ready, unavailable, n_cases = [], [], 0
    for sub in candidates:
        items, reason = prediction_items(session, sub, settings)
        if reason is not None:
            unavailable.append({"submission_id": sub.id, "reason": reason})
        else:
            ready.append(sub.id)
            n_cases += len(items)
    now = utcnow()
    job = RescoreJob(testset_id=testset.id, protocol_key=version.protocol_key, submission_ids=ready,
                     unavailable=unavailable, n_cases_total=n_cases, created_by_id=actor.id if actor else None,
                     created_at=now)
    if not ready:  # nothing to score: the job is done as it is made
        rescore_transition(job, RescoreState.done, now=now)
    session.add(job)
    session.flush()
    audit(session, actor, "testset.rescore", f"testset:{testset.id}",
          {"job": job.id, "protocol": version.protocol_key, "submissions": ready, "unavailable": unavailable})
    session.flush()
    return job


def enqueue_rescore(job: RescoreJob) -> None:
    """Send a queued job to a cpu worker (after the commit that stored it)."""
    if job.state is RescoreState.queued:
        from services import queue

        queue.send_task(RESCORE_TASK, args=[job.id], queue=CPU_QUEUE)


def get_job(session: Session, testset: TestSet, job_id: int) -> RescoreJob:
    job = session.get(RescoreJob, job_id)
    if job is None or job.testset_id != testset.id:
        raise RescoringError(f"no re-scoring job {job_id} on test set {testset.name!r}", 404)
    return job


def job_status(job: RescoreJob) -> dict[str, Any]:
    """The job as JSON-ready data (the CLI and the API print this): progress = cases scored / total."""
    total = int(job.n_cases_total or 0)
    return {
        "job_id": job.id, "protocol_key": job.protocol_key, "state": job.state.value,
        "submission_ids": list(job.submission_ids or []), "unavailable": list(job.unavailable or []),
        "n_cases_total": total, "n_cases_done": int(job.n_cases_done or 0),
        "n_scores_written": int(job.n_scores_written or 0),
        "progress": (int(job.n_cases_done or 0) / total) if total else 1.0,
        "error": job.error,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def list_jobs(session: Session, testset: TestSet) -> list[RescoreJob]:
    return list(session.scalars(sa.select(RescoreJob).where(RescoreJob.testset_id == testset.id)
                                .order_by(RescoreJob.id.desc())))
