"""The audit trail: one function builds every audit row (who did what to which row), so every
action of the domain layer and of the worker is recorded the same way."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from services.db.models import AuditLog, User


def audit(db: Session, actor: User | None, action: str, target: str, details: dict[str, Any] | None = None) -> None:
    """Add the audit row of ``action`` on ``target`` (``"<table>:<id>"``, e.g. ``testset:3``) by
    ``actor`` (None: the system, e.g. a worker or a command run on the server) to the caller's
    session; it commits with the change it records."""
    db.add(AuditLog(actor_id=actor.id if actor else None, action=action, target=target, details=details or {}))
