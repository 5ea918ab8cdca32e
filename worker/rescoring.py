"""Re-scoring kept predictions under another protocol version, and deleting the predictions a test
set's retention no longer covers (cpu queue; the domain rules are services/rescoring.py).

``touchstone.rescore`` reads the valid predictions the runs left in storage
(``CaseRun.detail``: ``runs/submission-<id>/<part>/<run>/output/<case_id>``) and scores them through
:func:`worker.outputs.score_output` -- :func:`evaluation.scoring.score_case`, the function of the
scoring step and of ``touchstone evaluate`` -- under the job's protocol; a case whose run left no
valid prediction gets that protocol's worst value with the status it had. No container is started:
nothing here touches the container runtime. Scores are inserted with the UNIQUE key ignoring
conflicts and the counters are written after every case, so a redelivered job resumes where it
stopped. At the end the statistics of the new version are computed
(:func:`services.leaderboard.compute.recompute_protocol_version`).

``touchstone.reclaim_predictions`` deletes ``runs/submission-<id>`` of every submission that
:func:`services.rescoring.reclaimable_submissions` names, subtracts the bytes from its
``storage_bytes`` and stamps ``predictions_deleted_at``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from evaluation.io import GroundTruthError, ScoreStatus
from services import rescoring
from services.config import get_settings
from services.db.base import utcnow
from services.db.enums import RescoreState
from services.db.models import Case, RescoreJob, Score, Submission, TestSet, TestSetProtocol
from services.db.session import session_scope
from services.db.states import rescore_transition
from services.submissions import audit
from worker import pipeline
from worker.app import app
from worker.outputs import delete_tree, score_output

from worker.runs import RUNS_DIR

log = logging.getLogger("touchstone.worker")


def _storage_root() -> Path:
    return Path(get_settings().storage_dir).resolve()  # type: ignore[arg-type]


def _protocol(row: TestSetProtocol):
    from evaluation.protocols import Protocol

    return Protocol.from_dict(row.protocol_json)


def _previous_statuses(session, submission_id: int, protocol_key: str) -> dict[int, tuple[str, str | None]]:
    """case pk -> (status, detail) of the failed scores the submission has under ``protocol_key``
    (what the scoring step decided for a case without a valid prediction)."""
    out: dict[int, tuple[str, str | None]] = {}
    for case_pk, status, detail in session.execute(
            sa.select(Score.case_id, Score.status, Score.detail)
            .where(Score.submission_id == submission_id, Score.protocol_key == protocol_key,
                   Score.status != ScoreStatus.OK.value).order_by(Score.id)):
        out.setdefault(int(case_pk), (status, detail))
    return out


def _fallback_status(run_status: str) -> ScoreStatus:
    return ScoreStatus.INVALID_PREDICTION if run_status == "invalid_output" else ScoreStatus.MISSING_PREDICTION


def _update_job(job_id: int, **values: Any) -> None:
    with session_scope() as session:
        session.execute(sa.update(RescoreJob).where(RescoreJob.id == job_id).values(**values)
                        .execution_options(synchronize_session=False))


def _fail_job(job_id: int, error: str) -> None:
    with session_scope() as session:
        job = session.get(RescoreJob, job_id)
        if job is not None and job.state not in (RescoreState.done, RescoreState.failed):
            rescore_transition(job, RescoreState.failed, error)


def _add_unavailable(job_id: int, submission_id: int, reason: str) -> None:
    with session_scope() as session:
        job = session.get(RescoreJob, job_id)
        listed = [u for u in (job.unavailable or []) if u.get("submission_id") != submission_id]
        job.unavailable = [*listed, {"submission_id": submission_id, "reason": reason}]


@app.task(name=rescoring.RESCORE_TASK)
def rescore(job_id: int) -> str:
    """Score the job's submissions under its protocol version, then compute that version's statistics."""
    try:
        return _rescore(job_id)
    except Exception as exc:
        # a job left "running" would keep its submissions' predictions from the reclaim forever
        log.exception("re-scoring job %s failed", job_id)
        _fail_job(job_id, f"{type(exc).__name__}: {exc}; see the worker log, then start the job again")
        raise


def _rescore(job_id: int) -> str:
    from evaluation.scoring import worst_rows

    with session_scope() as session:
        job = session.get(RescoreJob, job_id)
        if job is None or job.state in (RescoreState.done, RescoreState.failed):
            return "nothing to do"
        testset = session.get(TestSet, job.testset_id)
        version = session.scalar(sa.select(TestSetProtocol).where(TestSetProtocol.testset_id == job.testset_id,
                                                                  TestSetProtocol.protocol_key == job.protocol_key))
        if testset is None or version is None:
            rescore_transition(job, RescoreState.failed, "its protocol version is gone")
            return "failed"
        rescore_transition(job, RescoreState.running)
        protocol, key, current_key = _protocol(version), job.protocol_key, testset.protocol_key
        submission_ids = [int(i) for i in job.submission_ids or []]
        testset_id = testset.id
    storage = _storage_root()
    done = written = 0
    rescored: list[int] = []
    for submission_id in submission_ids:
        with session_scope() as session:
            sub = session.get(Submission, submission_id)
            items, reason = rescoring.prediction_items(session, sub, get_settings())
            scored = pipeline.scored_case_pks(session, submission_id, key)
            previous = _previous_statuses(session, submission_id, current_key)
            labels = {pk: path for pk, path in session.execute(
                sa.select(Case.id, Case.labels_path).where(Case.testset_id == testset_id))}
        if reason is not None:
            # deleted since the job was made: reported with the others, never silently skipped
            _add_unavailable(job_id, submission_id, reason)
            continue
        for item in items:
            case_pk, case_id = item["case_pk"], item["case_id"]
            if case_pk not in scored:
                try:
                    if item["prediction"]:
                        rows = score_output(case_id, Path(labels[case_pk]), (storage / item["prediction"]).parent,
                                            protocol)
                    else:
                        status, detail = previous.get(case_pk, (_fallback_status(item["run_status"]).value, None))
                        rows = worst_rows(case_id, protocol, status, detail or "")
                except GroundTruthError as exc:
                    log.error("re-scoring job %s: ground truth of case %s cannot be used: %s", job_id, case_id, exc)
                    _fail_job(job_id, f"the ground truth of hidden case {case_id!r} cannot be used ({exc}); fix "
                                      "the test set and start the job again")
                    return f"failed: ground truth of {case_id}"
                with session_scope() as session:
                    written += pipeline.insert_scores_ignore(session, submission_id, case_pk, key, rows)
            done += 1
            _update_job(job_id, n_cases_done=done, n_scores_written=written)
        rescored.append(submission_id)
    with session_scope() as session:
        from services.leaderboard.compute import recompute_protocol_version

        testset = session.get(TestSet, testset_id)
        recompute_protocol_version(session, testset, key)
        job = session.get(RescoreJob, job_id)
        rescore_transition(job, RescoreState.done)
        job.submission_ids = rescored
    log.info("re-scoring job %s: %d case(s) of %d submission(s) under %s, %d score row(s)",
             job_id, done, len(rescored), key, written)
    return f"{written} score row(s) under {key}"


@app.task(name=rescoring.RECLAIM_TASK)
def reclaim_predictions(submission_ids: list[int] | None = None) -> str:
    """Delete the run folders of the submissions past their test set's retention (all of them, or
    those of ``submission_ids``); returns how many and the bytes freed."""
    now = utcnow()
    with session_scope() as session:
        candidates = rescoring.reclaimable_submissions(session, now)
    if submission_ids is not None:
        wanted = {int(i) for i in submission_ids}
        candidates = [c for c in candidates if c in wanted]
    freed_total, n = 0, 0
    for submission_id in candidates:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            # checked again under the lock: a re-scoring job may have claimed it meanwhile
            if sub is None or submission_id not in rescoring.reclaimable_submissions(session, now, sub.testset_id):
                continue
            freed = delete_tree(_storage_root() / RUNS_DIR / f"submission-{submission_id}")
            sub.storage_bytes = max(0, int(sub.storage_bytes or 0) - freed)
            sub.predictions_deleted_at = now
            audit(session, None, "submission.predictions.deleted", submission_id,
                  {"bytes": freed, "retention_days": sub.testset.prediction_retention_days})
            freed_total += freed
            n += 1
    return f"predictions of {n} submission(s) deleted, {freed_total} bytes freed"
