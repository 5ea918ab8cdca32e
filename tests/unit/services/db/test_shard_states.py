"""The shard state machine (services/db/states.py: SHARD_ALLOWED, shard_transition)."""

from __future__ import annotations

import pytest

from services.db.enums import FailureCode
from services.db.enums import ShardState as Sh
from services.db.models import Shard
from services.db.states import SHARD_ALLOWED, SHARD_TERMINAL, IllegalTransition, shard_transition


def _shard(state: Sh, attempts: int = 0) -> Shard:
    return Shard(id=3, index=0, case_ids=[], state=state, attempts=attempts)


def test_an_attempt_runs_and_succeeds():
    shard = _shard(Sh.pending)
    shard_transition(shard, Sh.running, owner="host:1")
    assert shard.state is Sh.running and shard.attempts == 1 and shard.worker_hostname == "host:1"
    assert shard.started_at is not None and shard.heartbeat_at == shard.started_at and shard.finished_at is None
    shard_transition(shard, Sh.succeeded)
    assert shard.state is Sh.succeeded and shard.finished_at is not None


def test_a_lost_attempt_goes_back_to_pending_and_a_failure_keeps_its_reason():
    shard = _shard(Sh.running, attempts=1)
    shard.worker_hostname = "gone:2"
    shard_transition(shard, Sh.pending, "the worker stopped answering")
    assert shard.state is Sh.pending and shard.worker_hostname is None
    assert shard.failure_reason == "the worker stopped answering" and shard.failure_code is None
    shard_transition(shard, Sh.running, owner="host:3")
    assert shard.attempts == 2 and shard.failure_reason is None
    shard_transition(shard, Sh.failed, "out of memory", FailureCode.OUT_OF_MEMORY)
    assert shard.failure_code == "out_of_memory" and shard.finished_at is not None


# deliberately like test_illegal_moves_raise_and_change_nothing in test_states.py: the same check on
# the shard machine, spelled out so that each file reads alone.
@pytest.mark.parametrize("current", list(Sh))
def test_illegal_moves_raise_the_same_error_as_submissions(current):
    for new in Sh:
        if new in SHARD_ALLOWED[current]:
            continue
        shard = _shard(current)
        with pytest.raises(IllegalTransition) as info:
            shard_transition(shard, new, "why", owner="h:1")
        assert shard.state is current
        assert str(info.value).startswith(f"shard 3 is {current.value}; it cannot become {new.value}")


def test_terminal_states_are_final_and_failing_needs_a_reason():
    assert all(not SHARD_ALLOWED[s] for s in SHARD_TERMINAL)
    with pytest.raises(ValueError, match="reason"):
        shard_transition(_shard(Sh.running), Sh.failed)
    with pytest.raises(ValueError, match="owner"):
        shard_transition(_shard(Sh.pending), Sh.running)
