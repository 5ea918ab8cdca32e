"""Test sets: anyone may list them and read their limits; organizers import and configure them;
case metadata is for organizers and analysts (inventors see the public-sample cases only)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, status
from sqlalchemy.orm import Session

from services.db.audit import audit
from services.api.deps import current_user, get_db, require_organizer
from services.api.errors import ApiError
from services.api.params import Offset, PageLimit10000
from services.api.schemas import CaseOut, TestSetImport, TestSetOut, TestSetUpdate
from services.db.enums import Role
from services.db.models import Case, TestSet, User
from services.db.testsets import ManifestError, import_testset

router = APIRouter(prefix="/testsets", tags=["testsets"])


def testset_out(db: Session, testset: TestSet) -> TestSetOut:
    n_cases, n_public = db.execute(
        sa.select(sa.func.count(Case.id), sa.func.count(Case.id).filter(Case.public_sample.is_(True))).where(
            Case.testset_id == testset.id
        )
    ).one()
    out = TestSetOut.model_validate(testset)
    out.n_cases, out.n_public_sample = n_cases, n_public
    return out


def get_testset(db: Session, name: str) -> TestSet:
    testset = db.scalar(sa.select(TestSet).where(TestSet.name == name))
    if testset is None:
        raise ApiError(f"no test set named {name!r}; list them with GET /api/v1/testsets", 404)
    return testset


@router.get("", response_model=list[TestSetOut])
def list_testsets(db: Session = Depends(get_db)) -> list[TestSetOut]:
    return [testset_out(db, t) for t in db.scalars(sa.select(TestSet).order_by(TestSet.id))]


@router.post("", response_model=TestSetOut, status_code=status.HTTP_201_CREATED)
def import_testset_endpoint(
    body: TestSetImport,
    request: Request,
    db: Session = Depends(get_db),
    organizer: User = Depends(require_organizer),
) -> TestSetOut:
    """Import a test set from a manifest CSV that lies on the server, inside one of
    TOUCHSTONE_IMPORT_ROOTS (files are checksummed). Any path that is not a readable file there --
    missing, unreadable, a folder, outside the roots, the data directory or the database -- is
    answered with the same 422."""
    try:
        testset = import_testset(
            db,
            body.name,
            body.manifest_path,
            protocol=body.protocol,
            settings=request.app.state.settings,
            actor=organizer,
            description=body.description,
            confine=True,
        )
    except ManifestError as exc:
        db.rollback()
        raise ApiError(str(exc), 409 if "already exists" in str(exc) else 422) from exc
    db.commit()
    return testset_out(db, testset)


@router.get("/{name}", response_model=TestSetOut)
def read_testset(name: str, db: Session = Depends(get_db)) -> TestSetOut:
    return testset_out(db, get_testset(db, name))


@router.patch("/{name}", response_model=TestSetOut)
def update_testset(
    name: str, body: TestSetUpdate, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)
) -> TestSetOut:
    """Set limits (time per case, memory, GPUs...), the quota (N per team per period), the
    prediction retention (all / none / N days) or open/close it."""
    testset = get_testset(db, name)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if not changes:
        raise ApiError("nothing to change: give at least one field (e.g. quota_submissions)", 422)
    from services.db.testsets import STATISTICS_SETTINGS, StatisticsSettingsError, update_statistics_settings

    statistics = {k: changes.pop(k) for k in STATISTICS_SETTINGS if k in changes}
    if "prediction_retention" in changes:
        from services.rescoring import RescoringError, set_prediction_retention

        try:
            set_prediction_retention(db, testset, changes.pop("prediction_retention"), actor=organizer)
        except RescoringError as exc:
            raise ApiError(str(exc), exc.status) from None
    for key, value in changes.items():
        setattr(testset, key, value)
    if changes:
        audit(db, organizer, "testset.update", f"testset:{testset.id}", changes)
    if statistics:  # one domain function (also the CLI's): validates, stores, recomputes the statistics
        try:
            update_statistics_settings(db, testset, actor=organizer, **statistics)
        except StatisticsSettingsError as exc:
            raise ApiError(str(exc), 422) from None
    db.commit()
    return testset_out(db, testset)


@router.get("/{name}/cases", response_model=list[CaseOut])
def list_cases(
    name: str,
    db: Session = Depends(get_db),
    user: User = Depends(current_user),
    offset: Offset = 0,
    limit: PageLimit10000 = 1000,
) -> list[Case]:
    """Organizers and analysts: every case with its metadata. Inventors: the public sample only."""
    testset = get_testset(db, name)
    query = sa.select(Case).where(Case.testset_id == testset.id)
    if user.role is Role.inventor:
        query = query.where(Case.public_sample.is_(True))
    return list(db.scalars(query.order_by(Case.id).offset(offset).limit(limit)))
