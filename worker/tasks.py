"""The Celery tasks: validate → validate_run → infer_shard (per shard) → score (per batch) → finalize,
and the reaper. Every state change of a submission goes through :func:`services.db.states.transition`.

========================  =====  ==============================================================
task                      queue  does
========================  =====  ==============================================================
touchstone.validate       cpu    received → validating; load the image, record its digest, check
                                 architecture (amd64) and size; enqueue validate_run
touchstone.validate_run   gpu    run the image on the public sample under the full sandbox; check
                                 the outputs; store the log (inventors see it); → queued, cut the
                                 hidden cases into shards, enqueue infer_shard per shard
touchstone.infer_shard    gpu    stage the shard's unscored cases, run the container, record
                                 CaseRuns and the shard's resources; enqueue score batches
touchstone.score          cpu    score a batch of cases (missing/invalid: the protocol's worst
                                 score) with INSERT ... ON CONFLICT DO NOTHING; enqueue finalize
                                 when the last case is scored
touchstone.finalize       cpu    evaluating → scored; call the statistics entry point
touchstone.reap           cpu    shards and validation runs without a heartbeat: retry (or fail
                                 the submission after ``max_attempts``); delete the tarballs of
                                 failed validations after ``failed_tarball_grace_s``
========================  =====  ==============================================================

Every task is idempotent: it locks its row, re-reads the state and does nothing when the work is
done or no longer wanted, so a redelivered message (acks_late), a reaper retry and a duplicate
all end in the same database.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from services.config import get_settings
from services.db import images as image_rules
from services.db.base import utcnow
from services.db.enums import ShardState
from services.db.enums import SubmissionState as S
from services.db.models import AuditLog, Case, CaseRun, Shard, Submission, TestSet
from services.db.session import get_sessionmaker, session_scope
from services.db.states import shard_transition, transition
from services.storage import Storage
from evaluation.io import GroundTruthError, ScoreStatus
from evaluation.scoring import ScoreRow
from worker import pipeline
from worker.app import CPU_QUEUE, GPU_QUEUE, app, worker_settings
from worker.monitoring import measure_tree
from worker.outputs import check_outputs, delete_tree, prune_outputs, score_output, score_outputs
from worker.runtime.base import (
    ContainerRuntime,
    EngineUnavailable,
    FailureCode,
    FailureReason,
    ImageInfo,
    ImageRejected,
    ResourceLimits,
    RunResult,
    RunSpec,
    check_image,
    per_case_wall_times,
)
from worker.sandbox import prepare_output_dir, shard_time_limit
from worker.staging import StagingError, stage_shard

log = logging.getLogger("touchstone.worker")

VALIDATION_SHARD_LABEL = "validation"
RUNS_DIR = "runs"

_runtime: ContainerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> ContainerRuntime:
    """The process's container runtime (the Docker engine), created on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from worker.runtime.docker import DockerRuntime

            _runtime = DockerRuntime()
        return _runtime


def set_runtime(runtime: ContainerRuntime | None) -> None:
    """Replace the runtime (unit tests use a fake)."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _storage_root() -> Path:
    return Path(get_settings().storage_dir).resolve()  # type: ignore[arg-type]


def _fresh_run_dir(submission_id: int, part: str) -> Path:
    """``runs/submission-<id>/<part>/<utc time>-<random>``: one folder per attempt, never reused."""
    stamp = utcnow().strftime("%Y%m%dT%H%M%S")
    path = _storage_root() / RUNS_DIR / f"submission-{submission_id}" / part / f"{stamp}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def _relative(path: Path) -> str:
    return path.resolve().relative_to(_storage_root()).as_posix()


def _engine_errors() -> tuple[type[BaseException], ...]:
    """What the container engine raises when it is down or restarting (retried, never the image's fault)."""
    import docker.errors
    import requests.exceptions

    return (EngineUnavailable, docker.errors.DockerException, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout)


def _public(text: str | None) -> str | None:
    """A text the team may read (failure reasons, the validation log) without server paths: the
    storage and data folders are replaced by ``<storage>`` / ``<data>``."""
    if not text:
        return text
    settings = get_settings()
    for folder, name in ((settings.storage_dir, "<storage>"), (settings.data_dir, "<data>")):
        for form in {str(Path(folder).resolve()), str(Path(folder).absolute()), str(folder)}:  # type: ignore[arg-type]
            if form and form not in (".", "/"):
                text = text.replace(form, name)
    return text


def _fail(session, sub: Submission, reason: str, code: FailureCode) -> bool:
    """Fail the submission with ``reason`` (server paths removed) and its ``code`` beside it."""
    return pipeline.fail_submission(session, sub, _public(reason) or reason, code)


def _attempts_exhausted(session, shard: Shard, sub: Submission, wsettings, last: str, now) -> bool:
    """The one "attempts exhausted" rule (infer_shard and reap): a shard that has used up
    ``max_attempts`` fails (``last`` says what happened to its last attempt) and fails its
    submission with the same reason; True when it did."""
    if shard.attempts < wsettings.max_attempts:
        return False
    reason = (f"Shard {shard.index} could not be completed in {shard.attempts} attempts ({last}); "
              "an organizer can re-run the submission.")
    shard_transition(shard, ShardState.failed, reason, FailureCode.ATTEMPTS_EXHAUSTED, now=now)
    _fail(session, sub, reason, FailureCode.ATTEMPTS_EXHAUSTED)
    return True


def _infrastructure_reason(what: str, attempts: int) -> str:
    return (f"Validation could not be completed ({what}, {attempts} attempt(s)); this is a problem on our side, "
            "not the image's fault, and it does not count against your team's quota; an organizer can re-run it.")


def _discard_run(submission_id: int, workdir: Path, failed: bool = True) -> None:
    """Delete a run's outputs (a failed, cancelled or abandoned run: its reason and log are stored);
    with ``keep_failed_outputs`` a failed run's outputs stay and are counted as the submission's."""
    delete_tree(workdir / "input")
    if failed and get_settings().keep_failed_outputs:
        with session_scope() as session:
            pipeline.add_storage_bytes(session, submission_id, measure_tree(workdir).bytes)
        return
    delete_tree(workdir)


def _audit(session, action: str, submission_id: int, **details: Any) -> None:
    session.add(AuditLog(actor_id=None, action=action, target=f"submission:{submission_id}", details=details))


@dataclass(frozen=True)
class _ImageSource:
    submission_id: int
    image_digest: str | None
    image_path: str | None
    image_ref: str | None
    team_id: int | None = None


def _image_source(sub: Submission) -> _ImageSource:
    return _ImageSource(sub.id, sub.image_digest, sub.image_path, sub.image_ref, sub.team_id)


def _image_from_ref(runtime: ContainerRuntime, source: _ImageSource) -> ImageInfo:
    """An ``image_ref`` under the ownership rule (:mod:`services.db.images`), checked again here
    before anything runs: a digest the team supplied is inspected by that digest; a reference in
    a configured registry is pulled, exactly as written, for this submission; anything else -- a
    local tag, a short id, another team's digest -- is refused. A tag is never resolved against
    the images already on the engine."""
    assert source.image_ref is not None
    ref, allowed = source.image_ref, get_settings().allowed_registries
    digest = image_rules.digest_of(ref)
    with session_scope() as session:
        owned = (source.team_id is not None and digest is not None
                 and image_rules.team_owns_image(session, source.team_id, digest))
        permitted = source.team_id is not None and image_rules.image_ref_allowed(session, source.team_id, ref, allowed)
    if not permitted:
        raise ImageRejected(FailureReason.image_refused(image_rules.refusal(allowed)))
    if owned:
        info = runtime.inspect_image(digest)  # type: ignore[arg-type]
    else:
        info = None
        if source.image_digest:  # pulled for this submission before (by content digest)
            try:
                info = runtime.inspect_image(source.image_digest)
            except ImageRejected:
                info = None
        if info is None:
            info = runtime.pull_image(ref)
    if source.image_digest and info.image_id != source.image_digest:
        raise ImageRejected(FailureReason.image_load_failed(
            f"{ref!r} now names image {info.image_id}, not the validated {source.image_digest}"))
    return info


def ensure_image(runtime: ContainerRuntime, source: _ImageSource) -> ImageInfo:
    """The submission's image on this worker's engine: for an ``image_ref``, under the ownership
    rule (:func:`_image_from_ref`); for an upload, found by its recorded digest, else loaded from
    the uploaded tarball in (shared) storage."""
    if source.image_ref:
        return _image_from_ref(runtime, source)
    if source.image_digest and source.image_path:
        try:
            return runtime.inspect_image(source.image_digest)
        except ImageRejected:
            pass  # not loaded on this node yet
    if source.image_path:
        tarball = Storage.from_settings().path(source.image_path)
        info = runtime.load_image(tarball)
        if source.image_digest and info.image_id != source.image_digest:
            raise ImageRejected(FailureReason.image_load_failed(
                f"the stored tarball now holds image {info.image_id}, not the validated {source.image_digest}"))
        return info
    raise ImageRejected(FailureReason.image_load_failed("the submission has neither an uploaded tarball nor an image reference"))


def _limits(testset: TestSet) -> ResourceLimits:
    wsettings = worker_settings()
    memory = int(testset.memory_bytes)
    return ResourceLimits(
        memory_bytes=memory,
        cpus=wsettings.container_cpus,
        pids=int(testset.pids_limit),
        shm_bytes=int(testset.shm_bytes),
        tmp_bytes=min(ResourceLimits.tmp_bytes, memory),
        output_bytes=wsettings.output_bytes,
        output_files=wsettings.output_files,
        output_depth=wsettings.output_depth,
    )


def _gpu_ids(testset: TestSet) -> tuple[str, ...] | None:
    ids = worker_settings().gpu_ids
    if not ids or testset.gpus <= 0:
        return None
    return ids[: testset.gpus]


def _gone(state: S | str) -> bool:
    return S(state) in (S.cancelled, S.failed)


def supervised_run(runtime: ContainerRuntime, spec: RunSpec, submission_id: int,
                   shard_id: int | None = None, owner: str | None = None, validation: bool = False) -> RunResult:
    """``runtime.run(spec)`` with a watcher thread that, every ``cancel_poll_s`` seconds, kills the
    container when the submission was cancelled (or failed) and, for a shard (or, with
    ``validation``, the submission's validation run), writes its heartbeat every ``heartbeat_s``
    seconds -- and kills the container when the run is no longer ours (the reaper gave it to
    another worker)."""
    wsettings = worker_settings()
    stop = threading.Event()
    make_session = get_sessionmaker()

    def watch() -> None:
        last_beat = time.monotonic()
        while not stop.wait(wsettings.cancel_poll_s):
            try:
                with make_session() as session:
                    state = session.scalar(sa.select(Submission.state).where(Submission.id == submission_id))
                    if state is None or _gone(state):
                        runtime.cancel(spec.submission_id, spec.shard_id)
                        continue
                    if owner and time.monotonic() - last_beat >= wsettings.heartbeat_s:
                        last_beat = time.monotonic()
                        if shard_id is not None:
                            ours = pipeline.beat(session, shard_id, owner)
                        elif validation:
                            ours = pipeline.beat_validation(session, submission_id, owner)
                        else:
                            ours = True
                        if not ours:
                            log.warning("%s of submission %s is no longer owned by %s; stopping its container",
                                        spec.shard_id, submission_id, owner)
                            runtime.cancel(spec.submission_id, spec.shard_id)
            except Exception:  # noqa: BLE001 - the watcher must outlive a database hiccup
                log.exception("watcher of submission %s", submission_id)

    watcher = threading.Thread(target=watch, name=f"touchstone-watch-{submission_id}", daemon=True)
    watcher.start()
    try:
        return runtime.run(spec)
    finally:
        stop.set()
        watcher.join(timeout=5)


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
        source = _image_source(sub)
    runtime = get_runtime()
    info: ImageInfo | None = None
    try:
        info = ensure_image(runtime, source)
        failure = check_image(info, worker_settings().max_image_bytes)
    except ImageRejected as exc:
        failure = exc.reason
    except _engine_errors() as exc:
        return _retry_validation(self, submission_id, None, exc)
    with session_scope() as session:
        sub = pipeline.lock_submission(session, submission_id)
        if sub is None or sub.state is not S.validating:
            return "skipped: no longer validating"
        if failure is not None:
            _fail(session, sub, failure.message, failure.code)
            _audit(session, "submission.validate.rejected", submission_id, code=failure.code.value)
        else:
            assert info is not None
            sub.image_digest = info.image_id
            sub.validation_log = (
                f"image {info.image_id}: {info.os}/{info.architecture}, {info.size_bytes / 2**20:.1f} MiB "
                f"uncompressed, declared user {info.user or 'root'!r} (runs as nobody)\n"
            )
            _audit(session, "submission.validate.image", submission_id, digest=info.image_id,
                   architecture=info.architecture, os=info.os, size_bytes=info.size_bytes, user=info.user)
    if failure is not None:
        if info is not None:
            runtime.remove_image(info.image_id)
        return f"failed: {failure.code.value}"
    validate_run.apply_async(args=[submission_id], queue=GPU_QUEUE)
    return "image accepted"


# --------------------------------------------------------------------------------------------
# validate_run (gpu): the public sample
# --------------------------------------------------------------------------------------------
def _public_sample_failure(result: RunResult, report) -> FailureReason | None:
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


def _format_log(title: str, result: RunResult, report=None, public_rows: dict[int, list[ScoreRow]] | None = None,
                labels: dict[int, tuple[str, Path]] | None = None) -> str:
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
        pipeline.release_validation(sub, utcnow())
        if retries >= wsettings.engine_max_retries or (sub.validation_attempts or 0) >= wsettings.max_attempts:
            sub.counts_against_quota = False
            _fail(session, sub, _infrastructure_reason("the container engine on the worker failed",
                                                       sub.validation_attempts or 0), FailureCode.INFRASTRUCTURE)
            _audit(session, "submission.validate.infrastructure", submission_id, error=type(exc).__name__)
            return "failed: infrastructure"
    raise task.retry(countdown=wsettings.engine_retry_s * min(2 ** retries, 8), max_retries=None)


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
        public = pipeline.public_cases(session, testset.id)
        cases = [(c.case_id, Path(c.image_path)) for c in public]
        labels = {c.id: (c.case_id, Path(c.labels_path)) for c in public}
        protocol, protocol_key = protocol_of(testset), testset.protocol_key
        source = _image_source(sub)
        per_case_s, limits, gpus = testset.time_per_case_s, _limits(testset), _gpu_ids(testset)
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
    except _engine_errors() as exc:
        return _retry_validation(self, submission_id, None, exc)
    if info is not None and cases:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state is not S.validating:
                return "skipped: not validating"
            if (sub.validation_attempts or 0) >= wsettings.max_attempts:
                sub.counts_against_quota = False
                _fail(session, sub, _infrastructure_reason(
                    "the workers running it were lost or their container engine failed", sub.validation_attempts),
                      FailureCode.INFRASTRUCTURE)
                return "failed: attempts exhausted"
            attempt = pipeline.claim_validation(sub, owner, utcnow())
        try:
            # a dead attempt's container may still be there (its worker or engine died): remove it
            runtime.cancel(str(submission_id), VALIDATION_SHARD_LABEL)
            runtime.remove_leftovers(str(submission_id), VALIDATION_SHARD_LABEL)
        except _engine_errors() as exc:
            return _retry_validation(self, submission_id, owner, exc)
        workdir = _fresh_run_dir(submission_id, VALIDATION_SHARD_LABEL)
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
            except _engine_errors() as exc:
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
                _discard_run(submission_id, workdir, failed=False)
            return "skipped: no longer validating"
        killed_elsewhere = cancelled  # still validating: not a cancel, e.g. an engine shutting down
        if not killed_elsewhere:
            sub.validation_log = (sub.validation_log or "") + (_public(run_log) or "")
            pipeline.release_validation(sub, utcnow())
        if killed_elsewhere:
            outcome = ""
        elif cancelled or failure is not None:
            if cancelled:
                outcome = "cancelled"
            else:
                assert failure is not None
                _fail(session, sub, f"Validation on the public sample failed: {failure.message}", failure.code)
                _audit(session, "submission.validate.failed", submission_id, code=failure.code.value)
                outcome = f"failed: {failure.code.value}"
        else:
            transition(sub, S.queued)
            for case_pk, rows in public_rows.items():
                pipeline.insert_scores_ignore(session, submission_id, case_pk, protocol_key, rows)
            shards = pipeline.create_shards(session, sub, sub.testset)
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
            _discard_run(submission_id, workdir, failed=True)
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


# --------------------------------------------------------------------------------------------
# infer_shard (gpu)
# --------------------------------------------------------------------------------------------
def _case_status(out_status: str, run_failure: FailureReason | None) -> tuple[str, ScoreStatus]:
    """(CaseRun status, Score status) of one case's output after the safety check; an ``ok`` case
    gets its final statuses when it is scored (:func:`worker.outputs.score_output`)."""
    if out_status == "ok":
        return "ok", ScoreStatus.OK
    if out_status == "invalid":
        return "invalid_output", ScoreStatus.INVALID_PREDICTION
    if run_failure is not None and run_failure.code is FailureCode.TIME_LIMIT:
        return "timeout", ScoreStatus.MISSING_PREDICTION
    return "missing_output", ScoreStatus.MISSING_PREDICTION


@app.task(name="touchstone.infer_shard", bind=True, max_retries=None)
def infer_shard(self, shard_id: int) -> str:
    wsettings = worker_settings()
    owner = pipeline.owner_token()
    now = utcnow()
    rescore: list[list[Any]] = []
    with session_scope() as session:
        shard = pipeline.lock_shard(session, shard_id)
        if shard is None:
            return "missing"
        sub = pipeline.lock_submission(session, shard.submission_id)
        assert sub is not None
        if sub.state not in pipeline.ACTIVE_STATES:
            if shard.state not in pipeline.TERMINAL_SHARD_STATES:
                shard_transition(shard, ShardState.cancelled, now=now)
            return f"skipped: submission is {sub.state.value}"
        if shard.state in pipeline.TERMINAL_SHARD_STATES:
            return f"skipped: shard is {shard.state.value}"
        if shard.state is ShardState.running and not pipeline.owner_is_gone(
                shard.worker_hostname, shard.heartbeat_at, now, wsettings.stale_after_s):
            # another live worker runs it (a duplicate delivery): look again later
            raise self.retry(countdown=max(wsettings.heartbeat_s, 1.0))
        if _attempts_exhausted(session, shard, sub, wsettings,
                               f"last: {shard.failure_reason or 'the worker running it was lost'}", now):
            return "failed: attempts exhausted"
        testset = sub.testset
        cases = pipeline.cases_by_id(session, testset.id, shard.case_ids)
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
            if run is not None and run.status == "ok" and run.detail and (_storage_root() / run.detail).is_dir():
                rescore.append([case.id, case.case_id, "ok", None, run.detail])
                continue
            to_run.append(case)
        if not to_run:
            shard_transition(shard, ShardState.succeeded, now=now)
            ready = pipeline.advance(session, sub)
            work = None
        else:
            shard_transition(shard, ShardState.running, owner=owner, now=now)
            if sub.state in (S.queued, S.evaluating):
                transition(sub, S.running)
            work = dict(
                submission_id=sub.id, index=shard.index, attempt=shard.attempts,
                cases=[(c.id, c.case_id, Path(c.image_path)) for c in to_run],
                source=_image_source(sub), per_case_s=testset.time_per_case_s,
                limits=_limits(testset), gpus=_gpu_ids(testset),
            )
            ready = False
    _enqueue_scoring(shard.submission_id, shard_id, rescore)
    if work is None:
        if ready:
            finalize.apply_async(args=[shard.submission_id], queue=CPU_QUEUE)
        return "nothing to run"
    return _run_shard(shard_id, owner, **work)


OUTPUT_LIMIT_CODES = frozenset({FailureCode.OUTPUT_TOO_LARGE, FailureCode.TOO_MANY_FILES,
                                FailureCode.OUTPUT_TOO_DEEP, FailureCode.FORBIDDEN_OUTPUT})


def _run_shard(shard_id: int, owner: str, *, submission_id: int, index: int, attempt: int,
               cases: list[tuple[int, str, Path]], source: _ImageSource, per_case_s: float,
               limits: ResourceLimits, gpus: tuple[str, ...] | None) -> str:
    runtime = get_runtime()
    label = f"shard-{index}"
    try:
        # an earlier attempt's container may still run on this node (its worker was killed): stop
        # it, and remove what it left behind (by label: this deployment, this submission, this shard)
        runtime.cancel(str(submission_id), label)
        runtime.remove_leftovers(str(submission_id), label)
    except _engine_errors() as exc:
        log.exception("shard %s: clean-up of earlier attempts failed", shard_id)
        return _shard_error(shard_id, owner, _public(f"the container engine failed ({exc})") or "")
    workdir = _fresh_run_dir(submission_id, label)
    try:
        try:
            info = ensure_image(runtime, source)
            staged = stage_shard([(case_id, ct) for _, case_id, ct in cases], workdir / "input")
            output = prepare_output_dir(workdir / "output")
        except ImageRejected as exc:
            delete_tree(workdir)
            return _shard_error(shard_id, owner, f"could not prepare the run: {exc.reason.message}")
        except (StagingError, OSError) + _engine_errors():
            # an infrastructure error on hidden cases: its text names organizer storage paths, so
            # it goes to the worker log, and the reason (which the team can read) stays generic
            log.exception("staging shard %s of submission %s failed", label, submission_id)
            delete_tree(workdir)
            return _shard_error(shard_id, owner, "could not prepare the run on the worker (an infrastructure "
                                "error, not the image's fault; details are in the worker log)")
        spec = RunSpec(
            image=info.image_id, input_dir=staged.input_dir, output_dir=output,
            time_limit_s=shard_time_limit(per_case_s, len(cases), worker_settings().startup_s),
            limits=limits, gpu_device_ids=gpus, submission_id=str(submission_id), shard_id=label,
            extra_input_mounts=staged.mounts, case_ids=staged.case_ids, image_volumes=info.volumes,
            stop_grace_s=worker_settings().stop_grace_s,
        )
        try:
            result = supervised_run(runtime, spec, submission_id, shard_id, owner)
        except Exception as exc:  # noqa: BLE001 - the engine failed us: retry the shard
            log.exception("shard %s: container run failed", shard_id)
            delete_tree(workdir)
            return _shard_error(shard_id, owner, _public(f"the container engine failed ({exc})") or "")
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
    cts = {case_id: ct for _, case_id, ct in cases}
    limit_broken = result.failure is not None and result.failure.code in OUTPUT_LIMIT_CODES
    report = check_outputs(output, cts)
    wall = per_case_wall_times(result.output_seen_s)
    items: list[list[Any]] = []
    keep_outputs = False
    with session_scope() as session:
        shard = pipeline.lock_shard(session, shard_id)
        sub = pipeline.lock_submission(session, submission_id)
        assert shard is not None and sub is not None
        if shard.worker_hostname != owner or shard.state is not ShardState.running:
            outcome = "abandoned: the shard was given to another worker"
        elif result.cancelled or sub.state not in pipeline.ACTIVE_STATES:
            shard_transition(shard, ShardState.cancelled)
            shard.log_tail, shard.run_seconds, shard.exit_code = result.log_tail, result.duration_s, result.exit_code
            outcome = "cancelled"
        else:
            outcome = ""
            for case_pk, case_id, _ in cases:
                out = report.cases[case_id]
                if limit_broken:
                    # a run that broke an output limit: none of its files is used (or kept)
                    run_status, score_status, detail, prediction = (
                        "invalid_output", ScoreStatus.INVALID_PREDICTION, result.failure.message, None)  # type: ignore[union-attr]
                else:
                    run_status, score_status = _case_status(out.status, result.failure)
                    detail = out.reason or (result.failure.message if result.failure else None)
                    prediction = _relative(output / case_id) if out.status == "ok" else None
                pipeline.upsert_case_run(session, submission_id, case_pk, shard_id, run_status,
                                         prediction if prediction else _public(detail),
                                         wall.get(case_id) if prediction else None)
                items.append([case_pk, case_id, score_status.value,
                              _public(detail) if score_status.is_failure else None, prediction])
                keep_outputs = keep_outputs or prediction is not None
            failure = result.failure or report.failure()
            if failure is None:
                shard_transition(shard, ShardState.succeeded)
            else:
                shard_transition(shard, ShardState.failed, _public(failure.message) or failure.code.value, failure.code)
            shard.run_seconds = result.duration_s
            shard.exit_code = result.exit_code
            shard.peak_memory_bytes = result.peak_memory_bytes
            if result.gpu is not None:
                shard.gpu_memory_peak_bytes = result.gpu.peak_bytes
                shard.gpu_memory_auc = result.gpu.area_byte_s
            shard.log_tail = result.log_tail  # hidden cases: organizers only
            ready = pipeline.advance(session, sub)
    if outcome:
        _discard_run(submission_id, workdir, failed=False)
        return outcome
    # the reason and the log are stored: only the valid predictions (inside the contract) stay,
    # for scoring and re-scoring; everything else the run wrote goes
    if keep_outputs:
        kept, _removed = prune_outputs(output, report)
        with session_scope() as session:
            pipeline.add_storage_bytes(session, submission_id, kept)
    else:
        _discard_run(submission_id, workdir, failed=True)
    _enqueue_scoring(submission_id, shard_id, items)
    if ready:
        finalize.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return f"ran {len(cases)} case(s) in attempt {attempt}: {len(report.ok_cases)} ok"


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
    size = worker_settings().score_batch_size
    for start in range(0, len(items), size):
        score.apply_async(args=[submission_id, shard_id, list(items[start : start + size])], queue=CPU_QUEUE)


# --------------------------------------------------------------------------------------------
# score (cpu)
# --------------------------------------------------------------------------------------------
_protocols: dict[str, Any] = {}


def protocol_of(testset: TestSet):
    """The test set's protocol, as stored with it (``protocol_json``), else the preset by key."""
    key = testset.protocol_key
    if key not in _protocols:
        from evaluation.protocols import Protocol, load_protocol

        try:
            _protocols[key] = Protocol.from_dict(testset.protocol_json)
        except Exception:  # noqa: BLE001 - an old row without the full description
            _protocols[key] = load_protocol(testset.protocol_name)
    return _protocols[key]


def worst_rows(case: Case, protocol, status: ScoreStatus | str, detail: str | None) -> list[ScoreRow]:
    """The protocol's worst score for every organ (a missing prediction, or one the safety check
    refused unread)."""
    from evaluation.scoring import worst_rows as evaluation_worst_rows

    return evaluation_worst_rows(case.case_id, protocol, status, detail or "")


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
                rows = prediction_rows(cases[case_pk], _storage_root() / prediction, protocol)
            else:
                rows = worst_rows(cases[case_pk], protocol, status, detail)
        except GroundTruthError as exc:
            # the organizer's data, not the submission: stop; the case and the error (which name
            # hidden cases and organizer paths) go to the log, the team reads a generic reason
            log.error("ground truth of case %s (test set case pk %s) cannot be used: %s", case_id, case_pk, exc)
            with session_scope() as session:
                sub = pipeline.lock_submission(session, submission_id)
                if sub is not None:
                    pipeline.fail_submission(session, sub, (
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


# --------------------------------------------------------------------------------------------
# finalize (cpu)
# --------------------------------------------------------------------------------------------
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
        _audit(session, "submission.scored", submission_id)
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


# --------------------------------------------------------------------------------------------
# reap (cpu)
# --------------------------------------------------------------------------------------------
@app.task(name="touchstone.reap")
def reap() -> str:
    """Retry the shards whose worker vanished: running with a heartbeat older than
    ``stale_after_s``. A shard that used up ``max_attempts`` fails its submission."""
    wsettings = worker_settings()
    now = utcnow()
    retried: list[int] = []
    failed = 0
    with session_scope() as session:
        candidates = pipeline.stale_shards(session, now, wsettings.stale_after_s)
    for shard_id in candidates:
        with session_scope() as session:
            shard = pipeline.lock_shard(session, shard_id)
            if shard is None or shard.state is not ShardState.running or not pipeline.owner_is_gone(
                    shard.worker_hostname, shard.heartbeat_at, utcnow(), wsettings.stale_after_s):
                continue
            sub = pipeline.lock_submission(session, shard.submission_id)
            assert sub is not None
            lost = f"the worker {shard.worker_hostname} running attempt {shard.attempts} stopped answering"
            if sub.state not in pipeline.ACTIVE_STATES:
                shard_transition(shard, ShardState.cancelled, now=now)
                continue
            if _attempts_exhausted(session, shard, sub, wsettings, lost, now):
                failed += 1
                continue
            shard_transition(shard, ShardState.pending, lost)
            retried.append(shard_id)
    for shard_id in retried:
        infer_shard.apply_async(args=[shard_id], queue=GPU_QUEUE)
    v_retried, v_failed = _reap_validations(wsettings)
    reclaimed = _reap_ended_submissions()
    return (f"retried {len(retried)}, failed {failed}; validations retried {v_retried}, failed {v_failed}; "
            f"storage of {reclaimed} ended submission(s) reclaimed")


def _reap_validations(wsettings) -> tuple[int, int]:
    """Validations whose worker vanished (claimed, heartbeat stale): retried, or failed with an
    infrastructure reason (not counting against the quota) after ``max_attempts``. Validations
    nobody claimed for ``validation_requeue_s`` (a lost message): sent again."""
    now = utcnow()
    retried: list[int] = []
    resent: list[int] = []
    failed = 0
    with session_scope() as session:
        stale = pipeline.stale_validations(session, now, wsettings.stale_after_s)
        quiet = pipeline.quiet_validations(session, now, wsettings.validation_requeue_s)
    for submission_id in stale:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state is not S.validating or not sub.worker_hostname or not pipeline.owner_is_gone(
                    sub.worker_hostname, sub.heartbeat_at, utcnow(), wsettings.stale_after_s):
                continue
            lost = f"the worker running attempt {sub.validation_attempts} stopped answering"
            pipeline.release_validation(sub, utcnow())
            if (sub.validation_attempts or 0) >= wsettings.max_attempts:
                sub.counts_against_quota = False
                _fail(session, sub, _infrastructure_reason(lost, sub.validation_attempts), FailureCode.WORKER_LOST)
                failed += 1
                continue
            retried.append(submission_id)
    for submission_id in quiet:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state is not S.validating or sub.worker_hostname:
                continue
            sub.heartbeat_at = utcnow()  # at most one resend per period
            resent.append(submission_id)
    for submission_id in retried:
        validate_run.apply_async(args=[submission_id], queue=GPU_QUEUE)
    for submission_id in resent:
        validate.apply_async(args=[submission_id], queue=CPU_QUEUE)
    return len(retried) + len(resent), failed


def _reap_ended_submissions() -> int:
    """Reclaim the storage of failed and cancelled submissions ``failed_tarball_grace_s`` after
    they ended (the window in which an organizer may re-run them from their tarball): the
    uploaded tarball is deleted (``image_path`` = None, ``image_deleted_at`` set) and, unless
    ``keep_failed_outputs``, every output folder of their runs (``runs/submission-<id>``: the
    predictions of shards that had finished before the failure or cancellation). Their
    ``storage_bytes`` is then what is left (0, or the kept outputs). Returns how many were reclaimed."""
    settings = get_settings()
    storage = Storage.from_settings(settings)
    now = utcnow()
    with session_scope() as session:
        candidates = pipeline.ended_submissions_holding_files(session, now, settings.failed_tarball_grace_s)
    reclaimed = 0
    for submission_id in candidates:
        with session_scope() as session:
            sub = pipeline.lock_submission(session, submission_id)
            if sub is None or sub.state not in (S.failed, S.cancelled):
                continue
            freed = 0
            try:
                if sub.image_path and sub.image_deleted_at is None:
                    path = storage.path(sub.image_path)
                    freed += path.lstat().st_size if path.exists() else 0
                    path.unlink(missing_ok=True)
                    sub.image_path, sub.image_deleted_at = None, now
                runs = _storage_root() / RUNS_DIR / f"submission-{submission_id}"
                kept = 0
                if runs.exists():
                    if settings.keep_failed_outputs:
                        kept = measure_tree(runs).bytes
                    else:
                        freed += delete_tree(runs)
            except (OSError, ValueError):
                log.exception("reclaiming the storage of submission %s failed", submission_id)
                continue
            if freed == 0 and sub.storage_bytes == kept:
                continue  # outputs kept for debugging: nothing changed since the last pass
            sub.storage_bytes = kept
            _audit(session, "submission.storage.reclaimed", submission_id, bytes=freed, kept_bytes=kept)
            reclaimed += 1
    return reclaimed


def submission_summary(submission_id: int) -> dict[str, Any]:
    """State, shard states and score count on hidden cases of a submission (tests and the
    benchmark read it)."""
    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        if sub is None:
            return {}
        shards = list(session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id)))
        from services.db.models import Score

        n_scores = session.scalar(
            sa.select(sa.func.count(Score.id)).join(Case, Case.id == Score.case_id)
            .where(Score.submission_id == submission_id, Case.public_sample.is_(False))
        ) or 0
        return {"state": sub.state.value, "failure_reason": sub.failure_reason, "failure_code": sub.failure_code,
                "shards": {s.index: s.state.value for s in shards}, "scores": n_scores,
                "at": dt.datetime.now(dt.timezone.utc).isoformat()}
