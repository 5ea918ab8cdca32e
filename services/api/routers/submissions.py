"""Submissions: upload (inventors), read (by visibility), organizer actions (cancel, re-run, publish).

The rules live in :mod:`services.submissions`; its errors become HTTP answers in services/api/errors.py."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends, Request, status
from sqlalchemy.orm import Session

from services import queue
from services import submissions as domain
from services.api import intake
from services.api.params import IdPath, Offset, PageLimit1000
from services.api.deps import current_user, get_db, require_organizer, require_role
from services.api.errors import ApiError
from services.api.schemas import ReasonIn, ShardOut, SubmissionLogs, SubmissionOut
from services.api.visibility import can_see_submission, visible_submissions
from services.db.enums import Role, SubmissionState
from services.db.models import Submission, TestSet, User
from services.storage import Storage

log = logging.getLogger("touchstone.api")
router = APIRouter(prefix="/submissions", tags=["submissions"])


def submission_out(submission: Submission) -> SubmissionOut:
    return SubmissionOut.model_validate(
        {
            **{c: getattr(submission, c) for c in SubmissionOut.model_fields if hasattr(Submission, c)},
            "algorithm": submission.algorithm.name,
            "team": submission.team.name,
            "testset": submission.testset.name,
        }
    )


def get_visible(db: Session, user: User, submission_id: int) -> Submission:
    submission = db.get(Submission, submission_id)
    if submission is None or not can_see_submission(user, submission):
        raise ApiError(f"no submission {submission_id} visible to you", 404)
    return submission


@router.post("", response_model=SubmissionOut, status_code=status.HTTP_202_ACCEPTED)
async def submit(
    request: Request, user: User = Depends(require_role(Role.inventor, Role.organizer))
) -> SubmissionOut:
    """Submit an image: ``multipart/form-data`` with text fields ``algorithm`` and ``testset`` and either
    a file part ``image`` (the output of ``docker save IMAGE``) or a text field ``image_ref``.

    The file is streamed to storage (sha256, size limit); the answer is 202 with the submission in
    state ``received``. Errors: 404 unknown algorithm/test set, 409 test set closed or same image
    already submitted, 413 too large, 415 not multipart, 422 not a single-image ``docker save`` tar,
    429 quota used up.
    """
    settings = request.app.state.settings
    storage = Storage(settings.storage_dir)
    # early checks from the query string, before reading a possibly huge body
    if request.query_params.get("testset") or request.query_params.get("algorithm"):
        with request.app.state.sessionmaker() as db:
            testset = intake.find_testset(db, request.query_params.get("testset"))
            algorithm = intake.find_algorithm(
                db, user, request.query_params.get("algorithm"), request.query_params.get("team")
            )
            _check_open(testset)
            domain.check_quota(db, algorithm.team_id, testset, intake.utcnow())
    parsed = await intake.stream_submission_form(request, storage, settings.max_upload_bytes)
    upload = parsed.upload
    try:
        fields = {**{k: v for k, v in request.query_params.items() if k in intake.TEXT_FIELDS}, **parsed.fields}
        image_ref = fields.get("image_ref") or None
        if (upload is None) == (image_ref is None):
            raise ApiError("send exactly one of a file part 'image' or a text field 'image_ref'", 422)
        if image_ref is not None and not intake.IMAGE_REF.match(image_ref):
            raise ApiError(f"{image_ref!r} is not a docker image reference (e.g. registry/name:tag)", 422)
        result = await _finish(request, user, fields, upload, parsed.relative_path, image_ref)
    except BaseException:
        if upload is not None:
            upload.abort()
            if upload.committed:
                storage.delete(parsed.relative_path)
        raise
    return result


def _check_open(testset: TestSet) -> None:
    if not testset.is_open:
        raise ApiError(f"test set {testset.name!r} is closed to submissions", 409)


async def _finish(request, user, fields, upload, relative_path, image_ref) -> SubmissionOut:
    from starlette.concurrency import run_in_threadpool

    if upload is not None:
        upload.commit()
        await run_in_threadpool(intake.check_docker_save_tar, upload.destination)

    def store() -> SubmissionOut:
        with request.app.state.sessionmaker() as db:
            testset = intake.find_testset(db, fields.get("testset"))
            algorithm = intake.find_algorithm(db, user, fields.get("algorithm"), fields.get("team"))
            _check_open(testset)
            submission = domain.record(
                db,
                user,
                algorithm,
                testset,
                image_path=relative_path if upload is not None else None,
                image_sha256=upload.sha256 if upload is not None else None,
                image_size=upload.size if upload is not None else None,
                image_ref=image_ref,
                settings=request.app.state.settings,
            )
            out = submission_out(submission)
        try:
            queue.enqueue_validation(out.id)
        except Exception:  # noqa: BLE001 - the submission is stored; an organizer can re-run it
            log.exception("could not enqueue validation of submission %s", out.id)
        return out

    return await run_in_threadpool(store)


@router.get("", response_model=list[SubmissionOut])
def list_submissions(
    db: Session = Depends(get_db),
    user: User = Depends(current_user),
    testset: str | None = None,
    state: SubmissionState | None = None,
    offset: Offset = 0,
    limit: PageLimit1000 = 100,
) -> list[SubmissionOut]:
    query = visible_submissions(sa.select(Submission), user)
    if testset:
        query = query.join(TestSet, TestSet.id == Submission.testset_id).where(TestSet.name == testset)
    if state:
        query = query.where(Submission.state == state)
    rows = db.scalars(query.order_by(Submission.id.desc()).offset(offset).limit(limit))
    return [submission_out(s) for s in rows]


@router.get("/{submission_id}", response_model=SubmissionOut)
def read_submission(submission_id: IdPath, db: Session = Depends(get_db), user: User = Depends(current_user)) -> SubmissionOut:
    return submission_out(get_visible(db, user, submission_id))


@router.get("/{submission_id}/logs", response_model=SubmissionLogs)
def read_logs(submission_id: IdPath, db: Session = Depends(get_db), user: User = Depends(current_user)) -> SubmissionLogs:
    """The public-sample (validation) run's log: the owning team and organizers."""
    submission = get_visible(db, user, submission_id)
    if user.role is Role.analyst:
        raise ApiError("validation logs are for the submitting team and organizers", 403)
    # keyword arguments one a line (alike in shape only to other constructors, e.g. worker/monitoring.py)
    return SubmissionLogs(
        id=submission.id,
        state=submission.state,
        failure_reason=submission.failure_reason,
        failure_code=submission.failure_code,
        validation_log=submission.validation_log,
    )


@router.get("/{submission_id}/shards", response_model=list[ShardOut])
def read_shards(submission_id: IdPath, db: Session = Depends(get_db), _: User = Depends(require_organizer)) -> list:
    """Per-shard runs over the hidden cases (organizers only: their logs may describe hidden cases)."""
    submission = db.get(Submission, submission_id)
    if submission is None:
        raise ApiError(f"no submission {submission_id}", 404)
    return list(submission.shards)


# cancel and rerun share their parameters deliberately: FastAPI reads each route's body, path and
# dependencies from its own signature.
@router.post("/{submission_id}/cancel", response_model=SubmissionOut)
def cancel(
    submission_id: IdPath,
    body: ReasonIn = Body(default_factory=ReasonIn),
    db: Session = Depends(get_db),
    organizer: User = Depends(require_organizer),
) -> SubmissionOut:
    return submission_out(domain.cancel(db, organizer, submission_id, body.reason))


@router.post("/{submission_id}/rerun", response_model=SubmissionOut, status_code=status.HTTP_202_ACCEPTED)
def rerun(
    submission_id: IdPath,
    body: ReasonIn = Body(default_factory=ReasonIn),
    db: Session = Depends(get_db),
    organizer: User = Depends(require_organizer),
) -> SubmissionOut:
    """Back to ``received`` and validated again; stored scores are kept and not recomputed."""
    submission = domain.rerun(db, organizer, submission_id, body.reason)
    queue.enqueue_validation(submission.id)
    return submission_out(submission)


@router.post("/{submission_id}/publish", response_model=SubmissionOut)
def publish(submission_id: IdPath, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)) -> SubmissionOut:
    """``scored -> published``; the leaderboard statistics are recomputed in the same transaction
    (if they fail, nothing changes and the answer is 500 saying so)."""
    return submission_out(domain.publish(db, organizer, submission_id))


@router.post("/{submission_id}/unpublish", response_model=SubmissionOut)
def unpublish(submission_id: IdPath, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)) -> SubmissionOut:
    return submission_out(domain.unpublish(db, organizer, submission_id))
