"""Who may see which rows -- in one place, so every router filters the same way.

- organizer: everything;
- inventor: their own team's algorithms and submissions (never another team's, not even whether
  they exist: invisible rows are 404);
- analyst: published submissions (and the algorithms that have one);
- public (no token): the published aggregates only (results router).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.sql import Select

from services.db.enums import Role, SubmissionState
from services.db.models import Algorithm, Submission, User


def visible_submissions(query: Select, user: User) -> Select:
    if user.role is Role.organizer:
        return query
    if user.role is Role.inventor:
        return query.where(Submission.team_id == user.team_id)
    return query.where(Submission.state == SubmissionState.published)


def can_see_submission(user: User, submission: Submission) -> bool:
    if user.role is Role.organizer:
        return True
    if user.role is Role.inventor:
        return submission.team_id == user.team_id
    return submission.state is SubmissionState.published


def visible_algorithms(query: Select, user: User) -> Select:
    if user.role is Role.organizer:
        return query
    if user.role is Role.inventor:
        return query.where(Algorithm.team_id == user.team_id)
    published = sa.select(Submission.algorithm_id).where(Submission.state == SubmissionState.published)
    return query.where(Algorithm.id.in_(published))


def can_see_case_images(user: User | None, submission: Submission, case_public_sample: bool) -> bool:
    """The case viewer (CT, ground truth, prediction of one case): organizers every case of every
    submission; inventors their own team's submissions on public-sample cases only; nobody else
    (other teams, analysts, the public) any image -- answered 404, so a hidden case id is never
    confirmed."""
    if user is None:
        return False
    if user.role is Role.organizer:
        return True
    return user.role is Role.inventor and submission.team_id == user.team_id and case_public_sample
