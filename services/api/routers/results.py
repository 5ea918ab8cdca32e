"""Results: the public leaderboard (published aggregates), per-submission aggregates and per-case
scores. Per-case scores of the hidden cases never reach inventors, published or not: they would let
a team tune to the test set. Inventors see their own public-sample cases only."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from services.api.deps import current_user, get_db, optional_user, require_organizer
from services.api.errors import ApiError
from services.api.schemas import AggregateOut, Leaderboard, ScoreOut, ScorePage
from services.db.aggregates import AVERAGE, compute_basic_aggregates
from services.db.enums import Role, SubmissionState
from services.db.models import Aggregate, Algorithm, AuditLog, Case, Score, Submission, Team, TestSet, User

router = APIRouter(prefix="/results", tags=["results"])
LOWER_IS_BETTER = {"hd95", "assd"}


@router.get("/leaderboard", response_model=Leaderboard)
def leaderboard(
    testset: str,
    metric: str = Query("dsc", pattern="^(dsc|nsd|hd95|assd)$"),
    protocol: str | None = Query(None, description="protocol key name@version; default the test set's"),
    db: Session = Depends(get_db),
) -> dict:
    """Published submissions of a test set ranked by the organ-average of ``metric`` (public)."""
    ts = db.scalar(sa.select(TestSet).where(TestSet.name == testset))
    if ts is None:
        raise ApiError(f"no test set named {testset!r}", 404)
    protocol_key = protocol or ts.protocol_key
    rows = db.execute(
        sa.select(Submission.id, Algorithm.name, Team.name, Submission.is_baseline, Aggregate.organ, Aggregate.mean)
        .join(Aggregate, Aggregate.submission_id == Submission.id)
        .join(Algorithm, Algorithm.id == Submission.algorithm_id)
        .join(Team, Team.id == Submission.team_id)
        .where(
            Submission.testset_id == ts.id,
            Submission.state == SubmissionState.published,
            Aggregate.protocol_key == protocol_key,
            Aggregate.scope == "overall",
            Aggregate.group_value == "",
            Aggregate.metric == metric,
        )
    ).all()
    # plain dicts: FastAPI validates the response against Leaderboard once
    entries: dict[int, dict] = {}
    for submission_id, algorithm, team, is_baseline, organ, mean in rows:
        entry = entries.get(submission_id)
        if entry is None:
            entry = entries[submission_id] = {
                "rank": 0, "submission_id": submission_id, "algorithm": algorithm, "team": team,
                "is_baseline": is_baseline, "average": None, "organs": {},
            }
        if organ == AVERAGE:
            entry["average"] = mean
        else:
            entry["organs"][organ] = mean
    sign = 1 if metric in LOWER_IS_BETTER else -1
    ordered = sorted(
        entries.values(), key=lambda e: (e["average"] is None, sign * (e["average"] or 0.0), e["submission_id"])
    )
    for rank, entry in enumerate(ordered, start=1):
        entry["rank"] = rank
    return {"testset": ts.name, "protocol_key": protocol_key, "metric": metric, "entries": ordered}


def _submission_for_results(db: Session, submission_id: int) -> Submission:
    submission = db.get(Submission, submission_id)
    if submission is None:
        raise ApiError(f"no submission {submission_id} with results visible to you", 404)
    return submission


@router.get("/submissions/{submission_id}/aggregates", response_model=list[AggregateOut])
def submission_aggregates(
    submission_id: int, db: Session = Depends(get_db), user: User | None = Depends(optional_user)
) -> list[Aggregate]:
    """Aggregates of a published submission (anyone); organizers: of any submission."""
    submission = _submission_for_results(db, submission_id)
    if submission.state is not SubmissionState.published and not (user and user.role is Role.organizer):
        raise ApiError(f"no submission {submission_id} with results visible to you", 404)
    return list(
        db.scalars(
            sa.select(Aggregate)
            .where(Aggregate.submission_id == submission_id)
            .order_by(Aggregate.protocol_key, Aggregate.scope, Aggregate.metric, Aggregate.organ, Aggregate.group_value)
        )
    )


@router.post("/submissions/{submission_id}/aggregates", response_model=list[AggregateOut])
def recompute_aggregates(
    submission_id: int, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)
) -> list[Aggregate]:
    """Recompute the overall aggregates from the stored scores (organizers)."""
    _submission_for_results(db, submission_id)
    compute_basic_aggregates(db, submission_id)
    db.add(AuditLog(actor_id=organizer.id, action="aggregates.compute", target=f"submission:{submission_id}", details={}))
    db.commit()
    return submission_aggregates(submission_id, db, organizer)


@router.get("/submissions/{submission_id}/scores", response_model=ScorePage)
def submission_scores(
    submission_id: int,
    db: Session = Depends(get_db),
    user: User = Depends(current_user),
    organ: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(1000, ge=1, le=10000),
) -> ScorePage:
    """Per-case scores. Organizers: any submission. Analysts: published ones. Inventors: their own
    team's submissions, public-sample cases only (hidden per-case results are never shown to them)."""
    submission = _submission_for_results(db, submission_id)
    columns = (Case.case_id, Case.hospital, Score.organ, Score.protocol_key, Score.dsc, Score.nsd, Score.hd95,
               Score.assd, Score.status, Score.detail)
    conditions = [Score.submission_id == submission_id]
    if user.role is Role.analyst:
        if submission.state is not SubmissionState.published:
            raise ApiError(f"no submission {submission_id} with results visible to you", 404)
    elif user.role is Role.inventor:
        if submission.team_id != user.team_id:
            raise ApiError(f"no submission {submission_id} with results visible to you", 404)
        conditions.append(Case.public_sample.is_(True))
    if organ:
        conditions.append(Score.organ == organ)
    count = sa.select(sa.func.count(Score.id)).where(*conditions)
    if user.role is Role.inventor:  # the public-sample condition needs the case
        count = count.join(Case, Case.id == Score.case_id)
    total = db.scalar(count)
    rows = db.execute(
        sa.select(*columns).join(Case, Case.id == Score.case_id).where(*conditions)
        .order_by(Score.id).offset(offset).limit(limit)
    ).all()
    items = [ScoreOut(**row._mapping) for row in rows]
    return ScorePage(submission_id=submission_id, total=total or 0, offset=offset, limit=limit, items=items)
