"""The leaderboard database: models (models.py), sessions (session.py), the submission state
machine (states.py) and migrations run through Alembic (migrate.py)."""

from services.db.base import Base, utcnow
from services.db.enums import Role, ShardState, SubmissionState
from services.db.models import (
    Aggregate,
    Algorithm,
    ApiToken,
    AuditLog,
    Case,
    CaseRun,
    Score,
    Shard,
    Submission,
    Team,
    TestSet,
    User,
)
from services.db.session import get_engine, get_sessionmaker, session_scope

__all__ = [
    "Aggregate",
    "Algorithm",
    "ApiToken",
    "AuditLog",
    "Base",
    "Case",
    "CaseRun",
    "Role",
    "Score",
    "Shard",
    "ShardState",
    "Submission",
    "SubmissionState",
    "Team",
    "TestSet",
    "User",
    "get_engine",
    "get_sessionmaker",
    "session_scope",
    "utcnow",
]
