"""Protocol versions of a test set (anyone) and re-scoring its kept predictions under another one
(organizers): ``POST /testsets/{name}/rescore`` answers 202 with the job, whose counters are its
progress (``GET /testsets/{name}/rescore/{job_id}``). The domain rules are services/rescoring.py."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, status
from sqlalchemy.orm import Session

from services import rescoring
from services.api.deps import get_db, require_organizer
from services.api.errors import ApiError
from services.api.params import IdPath
from services.api.routers.testsets import get_testset
from services.api.schemas import RescoreRequest
from services.db.models import TestSetProtocol, User

router = APIRouter(prefix="/testsets", tags=["rescoring"])


@router.get("/{name}/protocols")
def list_protocol_versions(name: str, db: Session = Depends(get_db)) -> list[dict[str, Any]]:
    """The protocol versions a test set has scores under: its current one (what every reader gets
    by default) and those added by re-scoring. ``protocol=`` of the leaderboard routes takes a key."""
    testset = get_testset(db, name)
    out: list[dict[str, Any]] = [
        {"protocol_key": testset.protocol_key, "current": True, "protocol": testset.protocol_json}]
    for row in db.scalars(sa.select(TestSetProtocol).where(TestSetProtocol.testset_id == testset.id)
                          .order_by(TestSetProtocol.id)):
        if row.protocol_key != testset.protocol_key:
            out.append({"protocol_key": row.protocol_key, "current": False, "protocol": row.protocol_json,
                        "added_at": row.created_at.isoformat()})
    return out


@router.post("/{name}/rescore", status_code=status.HTTP_202_ACCEPTED)
def start_rescore(name: str, body: RescoreRequest, request: Request, db: Session = Depends(get_db),
                  organizer: User = Depends(require_organizer)) -> dict[str, Any]:
    """Score the kept predictions of the test set's submissions (default: every scored or published
    one) under another protocol version, on a cpu worker, without running any container. A
    protocol file must lie inside TOUCHSTONE_IMPORT_ROOTS. Submissions whose predictions are gone
    are listed in ``unavailable`` with the reason."""
    testset = get_testset(db, name)
    try:
        job = rescoring.start_rescore(db, testset, body.protocol, submission_ids=body.submission_ids,
                                      settings=request.app.state.settings, confine=True, actor=organizer)
    except rescoring.RescoringError as exc:
        db.rollback()
        raise ApiError(str(exc), exc.status) from None
    db.commit()
    rescoring.enqueue_rescore(job)
    return rescoring.job_status(job)


@router.get("/{name}/rescore")
def list_rescore_jobs(name: str, db: Session = Depends(get_db),
                      _: User = Depends(require_organizer)) -> list[dict[str, Any]]:
    """The test set's re-scoring jobs, newest first."""
    return [rescoring.job_status(j) for j in rescoring.list_jobs(db, get_testset(db, name))]


@router.get("/{name}/rescore/{job_id}")
def read_rescore_job(name: str, job_id: IdPath, db: Session = Depends(get_db),
                     _: User = Depends(require_organizer)) -> dict[str, Any]:
    """One job: state, cases scored of the total, score rows written, unavailable submissions."""
    try:
        return rescoring.job_status(rescoring.get_job(db, get_testset(db, name), job_id))
    except rescoring.RescoringError as exc:
        raise ApiError(str(exc), exc.status) from None
