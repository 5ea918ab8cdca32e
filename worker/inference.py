"""Inference: ``touchstone.infer_shard`` (gpu) runs one shard of a queued submission -- claim the
shard, stage its unscored cases, run the container under the sandbox, record a ``CaseRun`` per
case and the shard's resources -- and hands the cases to :func:`worker.scoring.score` in batches.

One shard, top to bottom: :func:`infer_shard` → :func:`_claim_shard` (database: lock, the attempts
rule, which cases still need a run) → :func:`_run_shard` (stage, run, check the outputs unread) →
:func:`_record_shard` (database: CaseRuns, shard state and resources) → :func:`_enqueue_scoring`.

Idempotent like every task: a redelivered shard skips the cases that already have scores, and a
case an earlier attempt predicted but nobody scored is scored, not run again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.base import utcnow
from services.db.enums import ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Case, CaseRun, Shard, Submission
from services.db.session import session_scope
from services.db.states import SHARD_TERMINAL, shard_transition, transition
from evaluation.io import ScoreStatus
from worker import pipeline
from worker.app import CPU_QUEUE, GPU_QUEUE, app, worker_settings
from worker.finalize import finalize
from worker.outputs import OutputReport, check_outputs, delete_tree, prune_outputs
from worker.runs import ImageSource, discard_run, engine_errors, ensure_image, fail, fresh_run_dir, get_runtime
from worker.runs import gpu_ids, log, public_text, relative, run_limits, storage_root, supervised_run
from worker.runtime.base import (
    FailureCode,
    FailureReason,
    ImageRejected,
    ResourceLimits,
    RunResult,
    RunSpec,
    per_case_wall_times,
)
from worker.sandbox import prepare_output_dir, shard_time_limit
from worker.scoring import score
from worker.staging import StagingError, stage_shard

#: a run that broke one of these limits: none of its files is used (or kept)
OUTPUT_LIMIT_CODES = frozenset({FailureCode.OUTPUT_TOO_LARGE, FailureCode.TOO_MANY_FILES,
                                FailureCode.OUTPUT_TOO_DEEP, FailureCode.FORBIDDEN_OUTPUT})


# --------------------------------------------------------------------------------------------
# database side: the shard's cases, the attempts rule, CaseRuns
# --------------------------------------------------------------------------------------------
def cases_by_id(session: Session, testset_id: int, case_ids: Sequence[str]) -> dict[str, Case]:
    """The test set's cases named ``case_ids``, by case id."""
    rows = session.scalars(sa.select(Case).where(Case.testset_id == testset_id, Case.case_id.in_(list(case_ids))))
    return {case.case_id: case for case in rows}


def fail_if_attempts_exhausted(session: Session, shard: Shard, sub: Submission, last: str, now: dt.datetime) -> bool:
    """The one "attempts exhausted" rule (infer_shard and the reaper): a shard that has used up
    ``max_attempts`` fails (``last`` says what happened to its last attempt) and fails its
    submission with the same reason; True when it did."""
    if shard.attempts < worker_settings().max_attempts:
        return False
    reason = (f"Shard {shard.index} could not be completed in {shard.attempts} attempts ({last}); "
              "an organizer can re-run the submission.")
    shard_transition(shard, ShardState.failed, reason, FailureCode.ATTEMPTS_EXHAUSTED, now=now)
    fail(session, sub, reason, FailureCode.ATTEMPTS_EXHAUSTED)
    return True


def upsert_case_run(session: Session, submission_id: int, case_pk: int, shard_id: int | None,
                    status: str, detail: str | None, wall_seconds: float | None) -> CaseRun:
    """The one CaseRun of (submission, case): created, or overwritten by a later attempt."""
    run = session.scalar(sa.select(CaseRun).where(CaseRun.submission_id == submission_id, CaseRun.case_id == case_pk))
    if run is None:
        run = CaseRun(submission_id=submission_id, case_id=case_pk)
        session.add(run)
    run.shard_id = shard_id
    run.status = status
    run.detail = detail
    run.wall_seconds = wall_seconds
    return run


# --------------------------------------------------------------------------------------------
# infer_shard (gpu)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardWork:
    """What one attempt of a shard runs (read under the shard's lock, used outside it)."""

    submission_id: int
    index: int
    attempt: int
    cases: list[tuple[int, str, Path]]  # (case pk, case id, CT path)
    source: ImageSource
    per_case_s: float
    limits: ResourceLimits
    gpus: tuple[str, ...] | None

    @property
    def label(self) -> str:
        """The ``shard`` label of the container and the run folder's part."""
        return f"shard-{self.index}"


@app.task(name="touchstone.infer_shard", bind=True, max_retries=None)
def infer_shard(self, shard_id: int) -> str:
    owner = pipeline.owner_token()
    claimed = _claim_shard(self, shard_id, owner)
    if isinstance(claimed, str):
        return claimed
    submission_id, work, rescore, ready = claimed
    _enqueue_scoring(submission_id, shard_id, rescore)
    if work is None:
        if ready:
            finalize.apply_async(args=[submission_id], queue=CPU_QUEUE)
        return "nothing to run"
    return _run_shard(shard_id, owner, work)


def _claim_shard(task, shard_id: int, owner: str):
    """Lock the shard: skip it (an outcome string) when its submission is over or it is done;
    retry later when another live worker runs it; fail it when its attempts are used up. Else
    returns (submission id, the :class:`ShardWork` of this attempt or None when no case needs a
    run, the cases to score from an earlier attempt's outputs, whether the submission is ready to
    be finalized)."""
    wsettings = worker_settings()
    now = utcnow()
    rescore: list[list[Any]] = []
    with session_scope() as session:
        shard = pipeline.lock_shard(session, shard_id)
        if shard is None:
            return "missing"
        sub = pipeline.lock_submission(session, shard.submission_id)
        assert sub is not None
        if sub.state not in pipeline.ACTIVE_STATES:
            if shard.state not in SHARD_TERMINAL:
                shard_transition(shard, ShardState.cancelled, now=now)
            return f"skipped: submission is {sub.state.value}"
        if shard.state in SHARD_TERMINAL:
            return f"skipped: shard is {shard.state.value}"
        if shard.state is ShardState.running and not pipeline.owner_is_gone(
                shard.worker_hostname, shard.heartbeat_at, now, wsettings.stale_after_s):
            # another live worker runs it (a duplicate delivery): look again later
            raise task.retry(countdown=max(wsettings.heartbeat_s, 1.0))
        if fail_if_attempts_exhausted(session, shard, sub,
                                      f"last: {shard.failure_reason or 'the worker running it was lost'}", now):
            return "failed: attempts exhausted"
        testset = sub.testset
        cases = cases_by_id(session, testset.id, shard.case_ids)
        done = pipeline.scored_case_pks(session, sub.id, testset.protocol_key, [c.id for c in cases.values()])
        # cases predicted by an earlier attempt but not scored yet: score them, do not run them again
        earlier = {r.case_id: r for r in session.scalars(
            sa.select(CaseRun).where(CaseRun.submission_id == sub.id, CaseRun.case_id.in_([c.id for c in cases.values()])))}
        to_run: list[Case] = []
        for case_id in shard.case_ids:
            case = cases[case_id]
            if case.id in done:
                continue
            run = earlier.get(case.id)
            if run is not None and run.status == "ok" and run.detail and (storage_root() / run.detail).is_dir():
                rescore.append([case.id, case.case_id, ScoreStatus.OK.value, None, run.detail])
                continue
            to_run.append(case)
        if not to_run:
            shard_transition(shard, ShardState.succeeded, now=now)
            return sub.id, None, rescore, pipeline.advance(session, sub)
        shard_transition(shard, ShardState.running, owner=owner, now=now)
        if sub.state in (S.queued, S.evaluating):
            transition(sub, S.running)
        work = ShardWork(
            submission_id=sub.id, index=shard.index, attempt=shard.attempts,
            cases=[(c.id, c.case_id, Path(c.image_path)) for c in to_run],
            source=ImageSource.of(sub), per_case_s=testset.time_per_case_s,
            limits=run_limits(testset), gpus=gpu_ids(testset),
        )
        return sub.id, work, rescore, False


def _run_shard(shard_id: int, owner: str, work: ShardWork) -> str:
    """Stage the cases, run the container, check its outputs (unread), then record and enqueue."""
    runtime = get_runtime()
    submission_id, label = work.submission_id, work.label
    try:
        # an earlier attempt's container may still run on this node (its worker was killed): stop
        # it, and remove what it left behind (by label: this deployment, this submission, this shard)
        runtime.cancel(str(submission_id), label)
        runtime.remove_leftovers(str(submission_id), label)
    except engine_errors() as exc:
        log.exception("shard %s: clean-up of earlier attempts failed", shard_id)
        return _shard_error(shard_id, owner, public_text(f"the container engine failed ({exc})") or "")
    workdir = fresh_run_dir(submission_id, label)
    try:
        try:
            info = ensure_image(runtime, work.source)
            staged = stage_shard([(case_id, ct) for _, case_id, ct in work.cases], workdir / "input")
            output = prepare_output_dir(workdir / "output")
        except ImageRejected as exc:
            delete_tree(workdir)
            return _shard_error(shard_id, owner, f"could not prepare the run: {exc.reason.message}")
        except (StagingError, OSError) + engine_errors():
            # an infrastructure error on hidden cases: its text names organizer storage paths, so
            # it goes to the worker log, and the reason (which the team can read) stays generic
            log.exception("staging shard %s of submission %s failed", label, submission_id)
            delete_tree(workdir)
            return _shard_error(shard_id, owner, "could not prepare the run on the worker (an infrastructure "
                                "error, not the image's fault; details are in the worker log)")
        spec = RunSpec(
            image=info.image_id, input_dir=staged.input_dir, output_dir=output,
            time_limit_s=shard_time_limit(work.per_case_s, len(work.cases), worker_settings().startup_s),
            limits=work.limits, gpu_device_ids=work.gpus, submission_id=str(submission_id), shard_id=label,
            extra_input_mounts=staged.mounts, case_ids=staged.case_ids, image_volumes=info.volumes,
            stop_grace_s=worker_settings().stop_grace_s,
        )
        try:
            result = supervised_run(runtime, spec, submission_id, shard_id, owner)
        except Exception as exc:  # noqa: BLE001 - the engine failed us: retry the shard
            log.exception("shard %s: container run failed", shard_id)
            delete_tree(workdir)
            return _shard_error(shard_id, owner, public_text(f"the container engine failed ({exc})") or "")
    finally:
        delete_tree(workdir / "input")

    if result.failure is not None and result.failure.code is FailureCode.RUNTIME_ERROR:
        delete_tree(workdir)
        return _shard_error(shard_id, owner, result.failure.message)
    if result.cancelled:
        with session_scope() as session:
            state = session.scalar(sa.select(Submission.state).where(Submission.id == submission_id))
        if state is not None and S(state) in pipeline.ACTIVE_STATES:
            # killed from outside while the submission goes on (an engine shutting down): retry
            delete_tree(workdir)
            return _shard_error(shard_id, owner, "the container was stopped by the engine (an infrastructure "
                                "error, not the image's fault)")
    report = check_outputs(output, {case_id: ct for _, case_id, ct in work.cases})
    outcome, items, ready = _record_shard(shard_id, owner, work, result, report, output)
    if outcome:
        discard_run(submission_id, workdir, failed=False)
        return outcome
    # the reason and the log are stored: only the valid predictions (inside the contract) stay,
    # for scoring and re-scoring; everything else the run wrote goes
    if any(item[4] for item in items):
        kept, _removed = prune_outputs(output, report)
        with session_scope() as session:
            pipeline.add_storage_bytes(session, submission_id, kept)
    else:
        discard_run(submission_id, workdir, failed=True)
    _enqueue_scoring(submission_id, shard_id, items)
    if ready:
        finalize.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return f"ran {len(work.cases)} case(s) in attempt {work.attempt}: {len(report.ok_cases)} ok"


def case_statuses(out_status: str, run_failure: FailureReason | None) -> tuple[str, ScoreStatus]:
    """(CaseRun status, Score status) of one case's output after the safety check; an ``ok`` case
    gets its final statuses when it is scored (:func:`worker.outputs.score_output`)."""
    if out_status == "ok":
        return "ok", ScoreStatus.OK
    if out_status == "invalid":
        return "invalid_output", ScoreStatus.INVALID_PREDICTION
    if run_failure is not None and run_failure.code is FailureCode.TIME_LIMIT:
        return "timeout", ScoreStatus.MISSING_PREDICTION
    return "missing_output", ScoreStatus.MISSING_PREDICTION


def _record_shard(shard_id: int, owner: str, work: ShardWork, result: RunResult, report: OutputReport,
                  output: Path) -> tuple[str, list[list[Any]], bool]:
    """Record the attempt under the shard's lock: a CaseRun per case, the shard's state and
    resources. Returns (an outcome when the attempt no longer counts -- abandoned or cancelled --
    else "", the scoring items ``[case pk, case id, score status, detail, prediction folder]``,
    whether the submission is ready to be finalized)."""
    submission_id = work.submission_id
    limit_broken = result.failure is not None and result.failure.code in OUTPUT_LIMIT_CODES
    wall = per_case_wall_times(result.output_seen_s)
    items: list[list[Any]] = []
    with session_scope() as session:
        shard = pipeline.lock_shard(session, shard_id)
        sub = pipeline.lock_submission(session, submission_id)
        assert shard is not None and sub is not None
        if shard.worker_hostname != owner or shard.state is not ShardState.running:
            return "abandoned: the shard was given to another worker", [], False
        if result.cancelled or sub.state not in pipeline.ACTIVE_STATES:
            shard_transition(shard, ShardState.cancelled)
            shard.log_tail, shard.run_seconds, shard.exit_code = result.log_tail, result.duration_s, result.exit_code
            return "cancelled", [], False
        for case_pk, case_id, _ in work.cases:
            out = report.cases[case_id]
            if limit_broken:
                # a run that broke an output limit: none of its files is used (or kept)
                run_status, score_status, detail, prediction = (
                    "invalid_output", ScoreStatus.INVALID_PREDICTION, result.failure.message, None)  # type: ignore[union-attr]
            else:
                run_status, score_status = case_statuses(out.status, result.failure)
                detail = out.reason or (result.failure.message if result.failure else None)
                prediction = relative(output / case_id) if out.status == "ok" else None
            upsert_case_run(session, submission_id, case_pk, shard_id, run_status,
                            prediction if prediction else public_text(detail),
                            wall.get(case_id) if prediction else None)
            items.append([case_pk, case_id, score_status.value,
                          public_text(detail) if score_status.is_failure else None, prediction])
        failure = result.failure or report.failure()
        if failure is None:
            shard_transition(shard, ShardState.succeeded)
        else:
            shard_transition(shard, ShardState.failed, public_text(failure.message) or failure.code.value, failure.code)
        shard.run_seconds = result.duration_s
        shard.exit_code = result.exit_code
        shard.peak_memory_bytes = result.peak_memory_bytes
        if result.gpu is not None:
            shard.gpu_memory_peak_bytes = result.gpu.peak_bytes
            shard.gpu_memory_auc = result.gpu.area_byte_s
        shard.log_tail = result.log_tail  # hidden cases: organizers only
        return "", items, pipeline.advance(session, sub)


def _shard_error(shard_id: int, owner: str, message: str) -> str:
    """Our side failed (engine, staging): give the shard back as pending and retry it (the attempt
    counter bounds the retries)."""
    with session_scope() as session:
        shard = pipeline.lock_shard(session, shard_id)
        if shard is None or shard.worker_hostname != owner or shard.state is not ShardState.running:
            return "abandoned"
        shard_transition(shard, ShardState.pending, message)
    infer_shard.apply_async(args=[shard_id], queue=GPU_QUEUE, countdown=5)
    return f"retrying: {message}"


def _enqueue_scoring(submission_id: int, shard_id: int, items: Sequence[list[Any]]) -> None:
    """Hand ``items`` to :func:`worker.scoring.score` in batches of ``score_batch_size`` cases."""
    size = worker_settings().score_batch_size
    for start in range(0, len(items), size):
        score.apply_async(args=[submission_id, shard_id, list(items[start : start + size])], queue=CPU_QUEUE)
