"""Users, teams and API tokens. Tokens are random; only their sha256 is stored, the plain token is
returned once at creation and cannot be recovered afterwards."""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.audit import audit
from services.db.base import utcnow
from services.db.enums import Role
from services.db.models import ApiToken, Submission, Team, User

TOKEN_PREFIX = "ts_"


class AccountError(ValueError):
    """A request that conflicts with stored accounts (the message says what to change)."""


def hash_token(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def new_plain_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def get_or_create_team(session: Session, name: str) -> Team:
    team = session.scalar(sa.select(Team).where(Team.name == name))
    if team is None:
        team = Team(name=name)
        session.add(team)
        session.flush()
    return team


def create_user(
    session: Session, name: str, role: Role | str, team_name: str | None = None, actor: User | None = None
) -> tuple[User, str]:
    """Create a user (and the team if new) with a first token; returns (user, plain token)."""
    role = Role(role)
    if session.scalar(sa.select(User.id).where(User.name == name)) is not None:
        raise AccountError(f"a user named {name!r} already exists; choose another name or create a token for it")
    if role is Role.inventor and not team_name:
        raise AccountError("an inventor belongs to a team: give --team / 'team'")
    team = get_or_create_team(session, team_name) if team_name else None
    user = User(name=name, role=role, team=team)
    session.add(user)
    session.flush()
    _, plain = create_token(session, user, label="initial")
    audit(session, actor, "user.create", f"user:{user.id}", {"name": name, "role": role.value, "team": team_name})
    return user, plain


def create_token(session: Session, user: User, label: str | None = None) -> tuple[ApiToken, str]:
    plain = new_plain_token()
    token = ApiToken(user_id=user.id, token_sha256=hash_token(plain), prefix=plain[:10], label=label)
    session.add(token)
    session.flush()
    return token, plain


def lookup_token(session: Session, plain: str) -> ApiToken | None:
    """The live (not revoked) token with this plain value, or None."""
    token = session.scalar(sa.select(ApiToken).where(ApiToken.token_sha256 == hash_token(plain)))
    if token is None or token.revoked_at is not None:
        return None
    return token


def revoke_token(session: Session, token: ApiToken) -> None:
    if token.revoked_at is None:
        token.revoked_at = utcnow()


def team_storage_bytes(session: Session, team_id: int | None = None) -> dict[int, int]:
    """Bytes each team's submissions hold in storage now (SUM of ``submissions.storage_bytes``:
    tarballs and kept outputs), by team id; every team (0 when it holds nothing), or only
    ``team_id``. Intake's cap, the teams listing and ``/metrics`` read this one sum."""
    query = (sa.select(Team.id, sa.func.coalesce(sa.func.sum(Submission.storage_bytes), 0))
             .join(Submission, Submission.team_id == Team.id, isouter=True).group_by(Team.id))
    if team_id is not None:
        query = query.where(Team.id == team_id)
    return {tid: int(total or 0) for tid, total in session.execute(query)}
