"""Rows the tests add over and over: an algorithm (with its team) and a submission of it, flushed
so that their ids are known."""

from __future__ import annotations

from typing import Any


def add_algorithm(session, name: str = "a", team=None, team_name: str = "t"):
    """An :class:`~services.db.models.Algorithm` named ``name`` of ``team`` (a new team named
    ``team_name`` when none is given), flushed."""
    from services.db.models import Algorithm, Team

    if team is None:
        team = Team(name=team_name)
        session.add(team)
        session.flush()
    algorithm = Algorithm(team_id=team.id, name=name)
    session.add(algorithm)
    session.flush()
    return algorithm


def add_submission(session, algorithm, testset, state, **columns: Any):
    """A :class:`~services.db.models.Submission` of ``algorithm`` (and its team) on ``testset`` in
    ``state``, with any other ``columns``, flushed."""
    from services.db.models import Submission

    submission = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=algorithm.team_id, state=state,
                            **columns)
    session.add(submission)
    session.flush()
    return submission
