"""Scoring: ``touchstone.score`` (cpu) scores a batch of a shard's cases through the one scoring
path (:func:`evaluation.scoring.score_case`, as ``touchstone evaluate``) and inserts the rows with
``INSERT ... ON CONFLICT DO NOTHING``; when the last case is scored it enqueues
:func:`worker.finalize.finalize`.

A case without a usable prediction (missing, or refused unread by the safety check of
:mod:`worker.outputs`) gets the protocol's worst score for every organ
(:func:`evaluation.scoring.worst_rows`) with its status.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from services.db.models import Case, CaseRun, Submission
from services.db.session import session_scope
from evaluation.io import GroundTruthError, ScoreStatus
from evaluation.scoring import ScoreRow, worst_rows
from worker import pipeline
from worker.app import CPU_QUEUE, app
from worker.finalize import finalize
from worker.outputs import score_output
from worker.runs import fail, log, protocol_of, storage_root
from worker.runtime.base import FailureCode


def prediction_rows(case: Case, prediction_dir: Path, protocol) -> list[ScoreRow]:
    """Score one checked prediction (``<output>/<case_id>``) against the case's labels through
    :func:`worker.outputs.score_output` -- :func:`evaluation.scoring.score_case`, as ``touchstone
    evaluate``: never raises for a bad prediction, it answers the worst score and a status per
    organ (or per case for a label map)."""
    return score_output(case.case_id, Path(case.labels_path), prediction_dir.parent, protocol)


@app.task(name="touchstone.score")
def score(submission_id: int, shard_id: int | None, items: list[list[Any]]) -> str:
    """Score ``items`` = [case pk, case id, status, detail, prediction folder relative to storage]."""
    written = 0
    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        if sub is None or sub.state not in pipeline.ACTIVE_STATES:
            return "skipped"
        testset = sub.testset
        protocol = protocol_of(testset)
        key = testset.protocol_key
        done = pipeline.scored_case_pks(session, submission_id, key, [item[0] for item in items])
        cases = {c.id: c for c in session.scalars(sa.select(Case).where(Case.id.in_([item[0] for item in items])))}
    for case_pk, case_id, status, detail, prediction in items:
        if case_pk in done:
            continue  # scored by an earlier delivery: never scored twice
        started = time.perf_counter()
        try:
            if ScoreStatus(status) is ScoreStatus.OK and prediction:
                rows = prediction_rows(cases[case_pk], storage_root() / prediction, protocol)
            else:
                rows = worst_rows(case_id, protocol, status, detail or "")
        except GroundTruthError as exc:
            # the organizer's data, not the submission: stop; the case and the error (which name
            # hidden cases and organizer paths) go to the log, the team reads a generic reason
            log.error("ground truth of case %s (test set case pk %s) cannot be used: %s", case_id, case_pk, exc)
            with session_scope() as session:
                sub = pipeline.lock_submission(session, submission_id)
                if sub is not None:
                    fail(session, sub, (
                        "The ground truth of a hidden case cannot be used (not the submission's fault); an "
                        "organizer must fix the test set (see the worker log) and re-run the submission."),
                         FailureCode.GROUND_TRUTH)
            return f"failed: ground truth of {case_id}"
        seconds = time.perf_counter() - started
        with session_scope() as session:
            written += pipeline.insert_scores_ignore(session, submission_id, case_pk, key, rows)
            session.execute(sa.update(CaseRun).where(CaseRun.submission_id == submission_id, CaseRun.case_id == case_pk)
                            .values(scoring_seconds=seconds).execution_options(synchronize_session=False))
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        ready = sub is not None and pipeline.advance(session, sub)
    if ready:
        finalize.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return f"{written} score row(s)"
