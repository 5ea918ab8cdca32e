"""Finalize: ``touchstone.finalize`` (cpu) moves a submission whose hidden cases are all scored from
``evaluating`` to ``scored`` and computes its leaderboard statistics
(``services.leaderboard.on_submission_scored``) in the same transaction.
"""

from __future__ import annotations

from services.db.enums import SubmissionState as S
from services.db.session import session_scope
from services.db.states import transition
from services.submissions import audit
from worker import pipeline
from worker.app import app
from worker.runs import log


def _statistics_entry_point():
    """``services.leaderboard.on_submission_scored`` (a seam: None when it does not exist)."""
    try:
        from services.leaderboard import on_submission_scored  # type: ignore[attr-defined]
    except ImportError as exc:
        log.warning("statistics entry point services.leaderboard.on_submission_scored is unavailable (%s)", exc)
        return None
    return on_submission_scored


def _mark_scored(submission_id: int, with_statistics) -> str | None:
    """evaluating → scored, and the statistics in the same transaction (so a reader never sees a
    scored submission without its aggregates). Returns None when it is not ready."""
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None or not pipeline.advance(session, sub):
            return None
        transition(sub, S.scored)
        audit(session, None, "submission.scored", submission_id, {})
        if with_statistics is not None:
            session.flush()
            with_statistics(session, submission_id)
    return "scored"


@app.task(name="touchstone.finalize")
def finalize(submission_id: int) -> str:
    """evaluating → scored; then the statistics entry point. When the statistics fail, the
    submission is still marked scored (without them; they can be recomputed) and the error logged."""
    entry_point = _statistics_entry_point()
    try:
        done = _mark_scored(submission_id, entry_point)
        note = "statistics done" if entry_point else "statistics unavailable"
    except Exception:  # noqa: BLE001 - statistics must not keep a finished evaluation from being scored
        log.exception("statistics of submission %s failed; marking it scored without them", submission_id)
        done = _mark_scored(submission_id, None)
        note = "statistics failed"
    if done is None:
        return "not ready"
    return f"scored; {note}"
