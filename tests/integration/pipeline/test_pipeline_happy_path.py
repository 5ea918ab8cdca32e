"""End to end: upload → validating → queued → running → evaluating → scored, with real Docker, real
Celery worker processes, PostgreSQL + Redis (production) and SQLite + filesystem:// (embedded)."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ORDER = ["received", "validating", "queued", "running", "evaluating", "scored"]


def _check_scored(stack, submission_id: int, n_hidden: int, min_mean_dsc: float) -> None:
    from evaluation.labels import ORGANS
    from services.db.models import Case, CaseRun, Score, Shard, Submission
    from services.db.session import session_scope

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        # every state was entered, in order (the state machine stamps each entry)
        stamps = [getattr(sub, f"{state}_at") for state in ORDER]
        assert all(stamps), stamps
        assert stamps == sorted(stamps)
        assert sub.image_digest and sub.image_digest.startswith("sha256:")
        public = session.scalars(sa.select(Case.case_id).where(Case.testset_id == sub.testset_id,
                                                               Case.public_sample.is_(True))).all()
        assert public and all(f"case {case_id}: ok" in sub.validation_log for case_id in public)
        all_scores = session.scalars(sa.select(Score).where(Score.submission_id == submission_id)).all()
        hidden = set(session.scalars(sa.select(Case.id).where(Case.testset_id == sub.testset_id,
                                                             Case.public_sample.is_(False))))
        public_pks = set(session.scalars(sa.select(Case.id).where(Case.testset_id == sub.testset_id,
                                                                 Case.public_sample.is_(True))))
        scores = [s for s in all_scores if s.case_id in hidden]
        assert len(scores) == n_hidden * len(ORGANS)
        assert {s.case_id for s in scores} == hidden
        # the public sample is scored too (the team's own per-case feedback), every organ once
        public_scores = [s for s in all_scores if s.case_id in public_pks]
        assert {s.case_id for s in public_scores} == public_pks
        assert len(public_scores) == len(public_pks) * len(ORGANS)
        assert len(all_scores) == len(scores) + len(public_scores)
        assert {s.protocol_key for s in scores} == {"touchstone@1"}
        dscs = [s.dsc for s in scores if s.dsc is not None]
        assert dscs and sum(dscs) / len(dscs) > min_mean_dsc
        runs = session.scalars(sa.select(CaseRun).where(CaseRun.submission_id == submission_id)).all()
        assert len(runs) == n_hidden
        assert all(r.status == "ok" and r.wall_seconds is not None and r.wall_seconds >= 0 for r in runs)
        assert all(r.scoring_seconds is not None and r.scoring_seconds > 0 for r in runs)
        # finalize called the statistics entry point: the submission's aggregates are stored
        from services.db.models import Aggregate

        n_aggregates = session.scalar(sa.select(sa.func.count(Aggregate.id)).where(Aggregate.submission_id == submission_id))
        assert n_aggregates > 0, stack.logs()
        shards = session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id)).all()
        assert shards and all(s.state.value == "succeeded" and s.attempts == 1 for s in shards)
        assert all(s.run_seconds > 0 and s.exit_code == 0 and s.log_tail for s in shards)
        assert sorted(c for s in shards for c in s.case_ids) == sorted(
            session.scalars(sa.select(Case.case_id).where(Case.id.in_(hidden))))


def test_classical_upload_scored_on_postgres_and_redis(redis_stack, phantom_manifest, classical_tarball, docker_client):
    stack = redis_stack
    stack.add_testset("phantoms", phantom_manifest, shard_size=3)
    stack.start_workers()
    seen: list[str] = []
    submission_id = stack.submit("phantoms", tarball=classical_tarball)
    summary = stack.wait(submission_id, seen=seen, timeout=240)
    assert summary["state"] == "scored", (summary, stack.logs())
    assert seen == [s for s in ORDER if s in seen]  # observed states never go backwards
    _check_scored(stack, submission_id, n_hidden=6, min_mean_dsc=0.5)
    assert not stack.containers(docker_client, submission_id)


def test_embedded_filesystem_broker_via_cli(embedded_stack, phantom_manifest, example_images):
    """The embedded default: `touchstone worker` (the CLI itself) on filesystem:// and SQLite."""
    import os
    import signal
    import subprocess
    import sys

    stack = embedded_stack
    stack.add_testset("phantoms", phantom_manifest, shard_size=4)
    log = stack.data_dir / "cli-worker.log"
    stack.log_files.append(log)
    cli = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "worker", "--queues", "gpu,cpu", "--concurrency", "2"],
        env={**os.environ, **stack.env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        submission_id = stack.submit("phantoms", image_ref=example_images["trivial"])
        summary = stack.wait(submission_id, timeout=180)
        assert summary["state"] == "scored", (summary, stack.logs())
        _check_scored(stack, submission_id, n_hidden=6, min_mean_dsc=0.0)
        assert summary["shards"] == {0: "succeeded", 1: "succeeded"}
        # the broker really is the folder under data_dir
        assert (stack.data_dir / "broker" / "messages").is_dir()
    finally:
        cli.send_signal(signal.SIGTERM)  # forwarded by the CLI to its Celery workers
        try:
            # a stop, not a crash: the CLI forwarded SIGTERM; it exits 0, or with its workers'
            # -SIGTERM status (which a process exit code carries as 256 - 15 = 241)
            assert cli.wait(timeout=60) in (0, -signal.SIGTERM, 256 - signal.SIGTERM), stack.logs()
        finally:
            try:
                os.killpg(cli.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert json.loads(json.dumps(summary))  # summary is plain data
