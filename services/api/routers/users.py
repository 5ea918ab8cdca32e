"""Users, teams and API tokens (organizers), and ``/users/me`` (anyone with a token)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Response, status
from sqlalchemy.orm import Session

from services.db.audit import audit
from services.api.deps import current_user, get_db, require_organizer
from services.api.errors import ApiError
from services.api.params import IdPath
from services.api.schemas import TeamCreate, TeamOut, TokenCreate, TokenCreated, TokenOut, UserCreate, UserOut
from services.db.accounts import AccountError, create_token, create_user, revoke_token
from services.db.models import ApiToken, Team, User

router = APIRouter(tags=["users"])

#: a response that shows a plain token must not be kept by any cache (browser, proxy)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def user_out(user: User) -> UserOut:
    return UserOut(
        id=user.id,
        name=user.name,
        role=user.role,
        team=user.team.name if user.team else None,
        is_active=user.is_active,
        created_at=user.created_at,
    )


def _user(db: Session, user_id: int) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise ApiError(f"no user with id {user_id}", 404)
    return user


@router.get("/users/me", response_model=UserOut)
def me(user: User = Depends(current_user)) -> UserOut:
    return user_out(user)


@router.get("/users", response_model=list[UserOut])
def list_users(db: Session = Depends(get_db), _: User = Depends(require_organizer)) -> list[UserOut]:
    return [user_out(u) for u in db.scalars(sa.select(User).order_by(User.id))]


@router.post("/users", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_user_endpoint(
    body: UserCreate, response: Response, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)
) -> TokenCreated:
    """Create a user (and its team if new). The response holds the user's token -- shown only once."""
    try:
        user, plain = create_user(db, body.name, body.role, body.team, actor=organizer)
    except AccountError as exc:
        db.rollback()
        raise ApiError(str(exc), 409 if "already exists" in str(exc) else 422) from exc
    db.commit()
    token = user.tokens[-1]
    response.headers.update(NO_STORE)
    return TokenCreated(token=plain, token_info=TokenOut.model_validate(token), user=user_out(user))


@router.get("/teams", response_model=list[TeamOut])
def list_teams(db: Session = Depends(get_db), _: User = Depends(require_organizer)) -> list[TeamOut]:
    """Every team with the storage its submissions hold (organizers only)."""
    from services.db.accounts import team_storage_bytes

    storage = team_storage_bytes(db)
    return [TeamOut(id=t.id, name=t.name, created_at=t.created_at, storage_bytes=storage.get(t.id, 0))
            for t in db.scalars(sa.select(Team).order_by(Team.id))]


@router.post("/teams", response_model=TeamOut, status_code=status.HTTP_201_CREATED)
def create_team(body: TeamCreate, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)) -> Team:
    if db.scalar(sa.select(Team.id).where(Team.name == body.name)) is not None:
        raise ApiError(f"a team named {body.name!r} already exists", 409)
    team = Team(name=body.name)
    db.add(team)
    db.flush()
    audit(db, organizer, "team.create", f"team:{team.id}", {"name": team.name})
    db.commit()
    return team


@router.get("/users/{user_id}/tokens", response_model=list[TokenOut])
def list_tokens(user_id: IdPath, db: Session = Depends(get_db), _: User = Depends(require_organizer)) -> list[ApiToken]:
    return list(_user(db, user_id).tokens)


@router.post("/users/{user_id}/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def new_token(
    user_id: IdPath, body: TokenCreate, response: Response, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)
) -> TokenCreated:
    """A new token for the user; the plain value is in this response only."""
    user = _user(db, user_id)
    token, plain = create_token(db, user, body.label)
    audit(db, organizer, "token.create", f"user:{user.id}", {"prefix": token.prefix})
    db.commit()
    response.headers.update(NO_STORE)
    return TokenCreated(token=plain, token_info=TokenOut.model_validate(token), user=user_out(user))


@router.delete("/tokens/{token_id}", response_model=TokenOut)
def revoke(token_id: IdPath, db: Session = Depends(get_db), organizer: User = Depends(require_organizer)) -> ApiToken:
    token = db.get(ApiToken, token_id)
    if token is None:
        raise ApiError(f"no token with id {token_id}", 404)
    revoke_token(db, token)
    audit(db, organizer, "token.revoke", f"token:{token.id}")
    db.commit()
    return token
