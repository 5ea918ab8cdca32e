"""Validation: ``touchstone.validate`` (cpu) checks the image itself, ``touchstone.validate_run``
(gpu) runs it on the public sample; a submission that passes is ``queued`` and cut into shards,
and each shard goes to :func:`worker.inference.infer_shard`.

========================  =====  ==============================================================
task                      queue  does
========================  =====  ==============================================================
touchstone.validate       cpu    received → validating; load the image, record its digest, check
                                 architecture (amd64) and size; enqueue validate_run
touchstone.validate_run   gpu    run the image on the public sample under the full sandbox; check
                                 the outputs; score them through the one scoring path; store the
                                 log (inventors see it); → queued, cut the hidden cases into
                                 shards, enqueue infer_shard per shard
========================  =====  ==============================================================

Like every task of the worker, both are idempotent: they lock the submission, re-read its state
and do nothing when the work is done or no longer wanted, so a redelivered message (acks_late), a
reaper retry and a duplicate all end in the same database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.base import utcnow
from services.db.enums import ShardState
from services.db.enums import SubmissionState as S
from services.db.models import Case, Shard, Submission, TestSet
from services.db.session import session_scope
from services.db.states import transition
from services.submissions import audit
from evaluation.scoring import ScoreRow
from worker import pipeline
from worker.app import CPU_QUEUE, GPU_QUEUE, app, worker_settings
from worker.finalize import finalize
from worker.inference import infer_shard
from worker.outputs import check_outputs, delete_tree, prune_outputs, score_outputs
from worker.runs import ImageSource, discard_run, engine_errors, ensure_image, fail, fresh_run_dir, get_runtime
from worker.runs import gpu_ids, log, protocol_of, public_text, run_limits, supervised_run
from worker.runtime.base import (
    EngineUnavailable,
    FailureCode,
    FailureReason,
    ImageInfo,
    ImageRejected,
    RunResult,
    RunSpec,
    check_image,
)
from worker.sandbox import prepare_output_dir, shard_time_limit
from worker.staging import stage_shard

#: the ``shard`` label of a validation run's container and the run folder's part
VALIDATION_SHARD_LABEL = "validation"


# --------------------------------------------------------------------------------------------
# database side: the validation claim, the public sample, the shards
# --------------------------------------------------------------------------------------------
def claim_validation(submission: Submission, owner: str, now: dt.datetime) -> int:
    """Make ``owner`` the worker running the (locked) submission's validation; returns the attempt."""
    submission.worker_hostname = owner
    submission.heartbeat_at = now
    submission.validation_attempts = (submission.validation_attempts or 0) + 1
    return submission.validation_attempts


def release_validation(submission: Submission, now: dt.datetime) -> None:
    """Give the (locked) submission's validation claim back (a retry, or the run ended)."""
    submission.worker_hostname = None
    submission.heartbeat_at = now


def infrastructure_reason(what: str, attempts: int) -> str:
    """The failure reason of a validation our side could not complete (it does not count against
    the quota: callers set ``counts_against_quota = False``)."""
    return (f"Validation could not be completed ({what}, {attempts} attempt(s)); this is a problem on our side, "
            "not the image's fault, and it does not count against your team's quota; an organizer can re-run it.")


def public_cases(session: Session, testset_id: int) -> list[Case]:
    """The cases of the public sample (validation runs on them; their scores are the team's feedback)."""
    return list(session.scalars(
        sa.select(Case).where(Case.testset_id == testset_id, Case.public_sample.is_(True)).order_by(Case.id)
    ))


def hidden_cases(session: Session, testset_id: int) -> list[Case]:
    """The cases a submission is scored on: every case of the test set outside the public sample."""
    return list(session.scalars(
        sa.select(Case).where(Case.testset_id == testset_id, Case.public_sample.is_(False)).order_by(Case.id)
    ))


def cut_into_shards(case_ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """Consecutive slices of at most ``shard_size`` cases (the last one may be shorter).

    ``shard_size == 1`` gives one container run per case (efficiency tracks)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    return [list(case_ids[i : i + shard_size]) for i in range(0, len(case_ids), shard_size)]


def create_shards(session: Session, submission: Submission, testset: TestSet) -> list[Shard]:
    """Create the submission's shards over its hidden cases (idempotent: existing shards are
    returned as they are, e.g. after an organizer re-run)."""
    existing = list(session.scalars(sa.select(Shard).where(Shard.submission_id == submission.id).order_by(Shard.index)))
    if existing:
        return existing
    case_ids = [case.case_id for case in hidden_cases(session, testset.id)]
    shards = [
        Shard(submission_id=submission.id, index=i, case_ids=ids, state=ShardState.pending, attempts=0)
        for i, ids in enumerate(cut_into_shards(case_ids, testset.shard_size))
    ]
    session.add_all(shards)
    session.flush()
    return shards


# --------------------------------------------------------------------------------------------
# validate (cpu): the image itself
# --------------------------------------------------------------------------------------------
@app.task(name="touchstone.validate", bind=True, max_retries=None)
def validate(self, submission_id: int) -> str:
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None:
            log.warning("validate: no submission %s", submission_id)
            return "missing"
        if sub.state is S.received:
            transition(sub, S.validating)
        elif sub.state is not S.validating:
            return f"skipped: submission is {sub.state.value}"
        source = ImageSource.of(sub)
    runtime = get_runtime()
    info: ImageInfo | None = None
    try:
        info = ensure_image(runtime, source)
        failure = check_image(info, worker_settings().max_image_bytes)
    except ImageRejected as exc:
        failure = exc.reason
    except engine_errors() as exc:
        return _retry_validation(self, submission_id, None, exc)
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None or sub.state is not S.validating:
            return "skipped: no longer validating"
        if failure is not None:
            fail(session, sub, failure.message, failure.code)
            audit(session, None, "submission.validate.rejected", submission_id, {"code": failure.code.value})
        else:
            assert info is not None
            sub.image_digest = info.image_id
            sub.validation_log = (
                f"image {info.image_id}: {info.os}/{info.architecture}, {info.size_bytes / 2**20:.1f} MiB "
                f"uncompressed, declared user {info.user or 'root'!r} (runs as nobody)\n"
            )
            audit(session, None, "submission.validate.image", submission_id, {
                "digest": info.image_id, "architecture": info.architecture, "os": info.os,
                "size_bytes": info.size_bytes, "user": info.user})
    if failure is not None:
        if info is not None:
            runtime.remove_image(info.image_id)
        return f"failed: {failure.code.value}"
    validate_run.apply_async(args=[submission_id], queue=GPU_QUEUE)
    return "image accepted"


def _retry_validation(task, submission_id: int, owner: str | None, exc: BaseException) -> str:
    """The engine failed the validation (it is restarting, its socket is gone): give the claim
    back and retry with a countdown (doubling up to 8x); after ``engine_max_retries`` retries or
    ``max_attempts`` runs the submission fails with an infrastructure reason that does not count
    against the team's quota."""
    wsettings = worker_settings()
    retries = task.request.retries or 0
    log.warning("validation of submission %s: container engine error (%s: %s); retry %d",
                submission_id, type(exc).__name__, exc, retries + 1)
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None or sub.state is not S.validating:
            return "skipped: no longer validating"
        if owner is not None and sub.worker_hostname not in (None, owner):
            return "abandoned: the validation was given to another worker"
        release_validation(sub, utcnow())
        if retries >= wsettings.engine_max_retries or (sub.validation_attempts or 0) >= wsettings.max_attempts:
            sub.counts_against_quota = False
            fail(session, sub, infrastructure_reason("the container engine on the worker failed",
                                                     sub.validation_attempts or 0), FailureCode.INFRASTRUCTURE)
            audit(session, None, "submission.validate.infrastructure", submission_id, {"error": type(exc).__name__})
            return "failed: infrastructure"
    raise task.retry(countdown=wsettings.engine_retry_s * min(2 ** retries, 8), max_retries=None)


# --------------------------------------------------------------------------------------------
# validate_run (gpu): the public sample
# --------------------------------------------------------------------------------------------
@app.task(name="touchstone.validate_run", bind=True, max_retries=None)
def validate_run(self, submission_id: int) -> str:
    wsettings = worker_settings()
    owner = pipeline.owner_token()
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None or sub.state is not S.validating:
            return "skipped: not validating"
        if sub.worker_hostname and sub.worker_hostname != owner and not pipeline.owner_is_gone(
                sub.worker_hostname, sub.heartbeat_at, utcnow(), wsettings.stale_after_s):
            # another live worker runs it (a duplicate delivery): look again later
            raise self.retry(countdown=max(wsettings.heartbeat_s, 1.0))
        testset = sub.testset
        public = public_cases(session, testset.id)
        cases = [(c.case_id, Path(c.image_path)) for c in public]
        labels = {c.id: (c.case_id, Path(c.labels_path)) for c in public}
        protocol, protocol_key = protocol_of(testset), testset.protocol_key
        source = ImageSource.of(sub)
        per_case_s, limits, gpus = testset.time_per_case_s, run_limits(testset), gpu_ids(testset)
    runtime = get_runtime()
    failure: FailureReason | None = None
    run_log = ""
    cancelled = False
    workdir: Path | None = None
    output: Path | None = None
    report = None
    public_rows: dict[int, list[ScoreRow]] = {}
    try:
        info = ensure_image(runtime, source)
    except ImageRejected as exc:
        info, failure = None, exc.reason
    except engine_errors() as exc:
        return _retry_validation(self, submission_id, None, exc)
    if info is not None and cases:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state is not S.validating:
                return "skipped: not validating"
            if (sub.validation_attempts or 0) >= wsettings.max_attempts:
                sub.counts_against_quota = False
                fail(session, sub, infrastructure_reason(
                    "the workers running it were lost or their container engine failed", sub.validation_attempts),
                     FailureCode.INFRASTRUCTURE)
                return "failed: attempts exhausted"
            attempt = claim_validation(sub, owner, utcnow())
        try:
            # a dead attempt's container may still be there (its worker or engine died): remove it
            runtime.cancel(str(submission_id), VALIDATION_SHARD_LABEL)
            runtime.remove_leftovers(str(submission_id), VALIDATION_SHARD_LABEL)
        except engine_errors() as exc:
            return _retry_validation(self, submission_id, owner, exc)
        workdir = fresh_run_dir(submission_id, VALIDATION_SHARD_LABEL)
        try:
            staged = stage_shard(cases, workdir / "input")
            output = prepare_output_dir(workdir / "output")
            spec = RunSpec(
                image=info.image_id, input_dir=staged.input_dir, output_dir=output,
                time_limit_s=shard_time_limit(per_case_s, len(cases), wsettings.startup_s),
                limits=limits, gpu_device_ids=gpus, submission_id=str(submission_id),
                shard_id=VALIDATION_SHARD_LABEL, extra_input_mounts=staged.mounts,
                case_ids=staged.case_ids, image_volumes=info.volumes, stop_grace_s=wsettings.stop_grace_s,
            )
            try:
                result = supervised_run(runtime, spec, submission_id, owner=owner, validation=True)
            except engine_errors() as exc:
                delete_tree(workdir)
                return _retry_validation(self, submission_id, owner, exc)
            cancelled = result.cancelled
            report = check_outputs(output, [case_id for case_id, _ in cases])
            failure = _public_sample_failure(result, report)
            if failure is None and not cancelled:
                # the one scoring path (evaluation.scoring, as `touchstone evaluate`): each file is
                # read once, here; the rows are the team's own feedback (public-sample cases are
                # left out of the benchmark's statistics; the hidden cases are never shown per
                # case), and a public case whose files the scorer refuses fails the validation
                public_rows = _score_public_sample(labels, output, protocol)
                failure = _public_rows_failure(public_rows, labels)
            run_log = _format_log(f"public sample ({len(cases)} case(s)), attempt {attempt}", result, report,
                                  public_rows, labels)
        finally:
            delete_tree(workdir / "input")

    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None or sub.state is not S.validating or (workdir is not None and sub.worker_hostname != owner):
            if workdir is not None:
                discard_run(submission_id, workdir, failed=False)
            return "skipped: no longer validating"
        killed_elsewhere = cancelled  # still validating: not a cancel, e.g. an engine shutting down
        if not killed_elsewhere:
            sub.validation_log = (sub.validation_log or "") + (public_text(run_log) or "")
            release_validation(sub, utcnow())
        if killed_elsewhere:
            outcome = ""
        elif failure is not None:
            fail(session, sub, f"Validation on the public sample failed: {failure.message}", failure.code)
            audit(session, None, "submission.validate.failed", submission_id, {"code": failure.code.value})
            outcome = f"failed: {failure.code.value}"
        else:
            transition(sub, S.queued)
            for case_pk, rows in public_rows.items():
                pipeline.insert_scores_ignore(session, submission_id, case_pk, protocol_key, rows)
            shards = create_shards(session, sub, sub.testset)
            pending = [s.id for s in shards if s.state is ShardState.pending]
            ready = not shards
            outcome = ""
    if killed_elsewhere:
        assert workdir is not None
        delete_tree(workdir)
        return _retry_validation(self, submission_id, owner, EngineUnavailable(
            "the container was killed by someone else while the submission was still validating"))
    if outcome:
        # the reason and the log are stored: the failed run's outputs go (settings.keep_failed_outputs)
        if workdir is not None:
            discard_run(submission_id, workdir, failed=True)
        return outcome
    if workdir is not None and output is not None and report is not None:
        kept, _removed = prune_outputs(output, report)  # nothing outside the contract stays
        with session_scope() as session:
            pipeline.add_storage_bytes(session, submission_id, kept)
    for shard_id in pending:
        infer_shard.apply_async(args=[shard_id], queue=GPU_QUEUE)
    if ready:
        finalize.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return f"queued {len(pending)} shard(s)"


def _public_sample_failure(result: RunResult, report) -> FailureReason | None:
    """The validation's failure from the run and the safety check of its outputs (None: both passed)."""
    if result.failure is not None:
        return result.failure
    bad = [out for out in report.cases.values() if out.status != "ok"]
    if not bad:
        return report.failure()
    if all(out.status == "missing" for out in report.cases.values()):
        return FailureReason.no_output()
    first = bad[0]
    more = f" (and {len(bad) - 1} more case(s))" if len(bad) > 1 else ""
    if first.status == "missing":
        return FailureReason(FailureCode.NO_OUTPUT, f"No prediction for public case {first.case_id} ({first.reason}){more}; "
                             "write an output for every case listed in /input/cases.json.")
    return FailureReason.invalid_output(f"case {first.case_id}: {first.reason}{more}")


def _score_public_sample(labels: dict[int, tuple[str, Path]], output: Path, protocol) -> dict[int, list[ScoreRow]]:
    """Score rows of each public-sample case (pk → rows) through :func:`worker.outputs.score_outputs`
    (:func:`evaluation.scoring.score_case`); a case whose ground truth is unusable is left
    unscored and logged (the organizer's data, not the submission's fault)."""
    pk_of = {case_id: case_pk for case_pk, (case_id, _) in labels.items()}
    by_id = score_outputs([(case_id, path) for case_id, path in labels.values()], output, protocol)
    return {pk_of[case_id]: rows for case_id, rows in by_id.items()}


def _public_rows_failure(public_rows: dict[int, list[ScoreRow]],
                         labels: dict[int, tuple[str, Path]]) -> FailureReason | None:
    """The validation's failure when the scorer refused a file of a public case (any row with a
    failure status): ``invalid_output`` naming the first such case and organ and why."""
    bad = [(labels[pk][0], rows, [r for r in rows if r.failed]) for pk, rows in public_rows.items()]
    bad = [entry for entry in bad if entry[2]]
    if not bad:
        return None
    case_id, rows, failed = bad[0]
    first = failed[0]
    organs = "all organs" if len(failed) == len(rows) else ", ".join(r.organ for r in failed)
    more = f" (and {len(bad) - 1} more case(s))" if len(bad) > 1 else ""
    return FailureReason.invalid_output(f"case {case_id} ({organs}): {first.status}: {first.detail}{more}")


def _format_log(title: str, result: RunResult, report=None, public_rows: dict[int, list[ScoreRow]] | None = None,
                labels: dict[int, tuple[str, Path]] | None = None) -> str:
    """The validation log the team reads: the run, each public case's check, every refused organ
    and the container log's tail."""
    lines = [f"== {title}", f"exit code {result.exit_code}, {result.duration_s:.1f} s"
             + (f", peak memory {result.peak_memory_bytes / 2**20:.0f} MiB" if result.peak_memory_bytes else "")]
    if result.failure is not None:
        lines.append(f"run: {result.failure.message}")
    if report is not None:
        for out in report.cases.values():
            lines.append(f"case {out.case_id}: {out.status}" + (f" -- {out.reason}" if out.reason else ""))
        if report.unexpected:
            lines.append("ignored at the top of /output: " + ", ".join(report.unexpected[:10]))
    for case_pk, rows in (public_rows or {}).items():
        case_id = labels[case_pk][0] if labels else str(case_pk)
        for row in rows:
            if row.failed:
                lines.append(f"case {case_id}, {row.organ}: {row.status} -- {row.detail}")
    lines.append("== container log (tail)")
    lines.append(result.log_tail.rstrip())
    return "\n".join(lines) + "\n"
