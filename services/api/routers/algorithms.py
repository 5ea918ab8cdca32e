"""Algorithms: inventors register their team's; organizers any team's."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, status
from sqlalchemy.orm import Session

from services.db.audit import audit
from services.api.deps import current_user, get_db, require_role
from services.api.errors import ApiError
from services.api.params import IdPath
from services.api.schemas import AlgorithmCreate, AlgorithmOut
from services.api.visibility import visible_algorithms
from services.db.accounts import get_or_create_team
from services.db.enums import Role
from services.db.models import Algorithm, Team, User

router = APIRouter(prefix="/algorithms", tags=["algorithms"])


def algorithm_out(algorithm: Algorithm) -> AlgorithmOut:
    return AlgorithmOut(
        id=algorithm.id,
        name=algorithm.name,
        team=algorithm.team.name,
        description=algorithm.description,
        paper_url=algorithm.paper_url,
        code_url=algorithm.code_url,
        created_at=algorithm.created_at,
    )


@router.get("", response_model=list[AlgorithmOut])
def list_algorithms(db: Session = Depends(get_db), user: User = Depends(current_user)) -> list[AlgorithmOut]:
    query = visible_algorithms(sa.select(Algorithm).order_by(Algorithm.id), user)
    return [algorithm_out(a) for a in db.scalars(query)]


@router.get("/{algorithm_id}", response_model=AlgorithmOut)
def read_algorithm(algorithm_id: IdPath, db: Session = Depends(get_db), user: User = Depends(current_user)) -> AlgorithmOut:
    algorithm = db.scalar(visible_algorithms(sa.select(Algorithm).where(Algorithm.id == algorithm_id), user))
    if algorithm is None:
        raise ApiError(f"no algorithm with id {algorithm_id} visible to you", 404)
    return algorithm_out(algorithm)


@router.post("", response_model=AlgorithmOut, status_code=status.HTTP_201_CREATED)
def create_algorithm(
    body: AlgorithmCreate,
    db: Session = Depends(get_db),
    user: User = Depends(require_role(Role.inventor, Role.organizer)),
) -> AlgorithmOut:
    if user.role is Role.organizer:
        if not body.team:
            raise ApiError("organizers must name the owning team: field 'team'", 422)
        team = get_or_create_team(db, body.team)
    else:
        if body.team and body.team != (user.team.name if user.team else None):
            raise ApiError("inventors register algorithms for their own team only; leave out 'team'", 403)
        if user.team_id is None:
            raise ApiError("your account has no team; ask an organizer to put you in one", 403)
        team = db.get(Team, user.team_id)
    if db.scalar(sa.select(Algorithm.id).where(Algorithm.team_id == team.id, Algorithm.name == body.name)):
        raise ApiError(f"team {team.name!r} already has an algorithm named {body.name!r}", 409)
    algorithm = Algorithm(
        team_id=team.id,
        name=body.name,
        description=body.description,
        paper_url=str(body.paper_url) if body.paper_url else None,
        code_url=str(body.code_url) if body.code_url else None,
    )
    db.add(algorithm)
    db.flush()
    audit(db, user, "algorithm.create", f"algorithm:{algorithm.id}", {"name": body.name})
    db.commit()
    db.refresh(algorithm)
    return algorithm_out(algorithm)
