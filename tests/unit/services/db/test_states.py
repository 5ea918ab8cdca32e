"""The submission state machine (services/db/states.py)."""

from __future__ import annotations

import pytest

from services.db.enums import SubmissionState as S
from services.db.models import Submission
from services.db.states import ALLOWED, UNFINISHED, IllegalTransition, can_transition, transition


def _sub(state: S) -> Submission:
    return Submission(id=7, state=state, counts_against_quota=True, rerun_count=0)


def test_happy_path_stamps_each_state():
    sub = _sub(S.received)
    for state in (S.validating, S.queued, S.running, S.evaluating, S.scored, S.published):
        transition(sub, state)
        assert sub.state is state and getattr(sub, f"{state.value}_at") is not None
    assert sub.counts_against_quota


def test_every_unfinished_state_can_fail_or_be_cancelled():
    for state in UNFINISHED:
        assert can_transition(state, S.failed) and can_transition(state, S.cancelled)
    for state in (S.scored, S.published):
        assert not can_transition(state, S.failed) and not can_transition(state, S.cancelled)


@pytest.mark.parametrize("current", list(S))
def test_illegal_moves_raise_and_change_nothing(current):
    for new in S:
        if new in ALLOWED[current]:
            continue
        sub = _sub(current)
        with pytest.raises(IllegalTransition) as info:
            transition(sub, new, "why")
        assert sub.state is current
        assert current.value in str(info.value) and new.value in str(info.value)


def test_failing_needs_a_reason():
    with pytest.raises(ValueError, match="reason"):
        transition(_sub(S.running), S.failed)


def test_failed_validation_stops_counting_against_the_quota():
    sub = _sub(S.validating)
    transition(sub, S.failed, "no /output written for the public sample")
    assert sub.counts_against_quota is False and sub.failure_reason.startswith("no /output")
    later = _sub(S.running)
    transition(later, S.failed, "shard 3 ran out of memory")
    assert later.counts_against_quota is True


def test_rerun_clears_the_reason_and_counts():
    sub = _sub(S.failed)
    sub.failure_reason = "boom"
    transition(sub, S.received)
    assert sub.state is S.received and sub.failure_reason is None and sub.rerun_count == 1


def test_unpublish_goes_back_to_scored():
    sub = _sub(S.published)
    transition(sub, "scored")
    assert sub.state is S.scored
