"""``GET /metrics`` on a real (SQLite, migrated) database with known rows, the stored failure codes
(and the one-time backfill of 0006_failure_codes against the workers' own sentences), and the
structured log lines."""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.observability import configure_logging, filesystem_queue_depths

MIGRATION_0006 = Path(__file__).resolve().parents[3] / "migrations" / "versions" / "0006_failure_codes.py"


def _migration_0006():
    spec = importlib.util.spec_from_file_location("migration_0006_failure_codes", MIGRATION_0006)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def app_and_db(tmp_path, monkeypatch):
    from services.api.app import create_app
    from services.config import Settings, get_settings
    from services.db import migrate
    from services.db.session import dispose_engines

    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(tmp_path / "data"))
    for var in ("TOUCHSTONE_DATABASE_URL", "TOUCHSTONE_BROKER_URL", "TOUCHSTONE_STORAGE_DIR"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    dispose_engines()
    settings = Settings()
    migrate.upgrade("head", settings.database_url)
    app = create_app(settings)
    yield app, settings
    dispose_engines()
    get_settings.cache_clear()


def _populate(sessionmaker, with_codes: bool = True) -> None:
    """Known rows; ``with_codes=False`` leaves ``failure_code`` empty (rows from before 0006)."""
    from services.db.base import utcnow
    from services.db.enums import Role, ShardState, SubmissionState
    from services.db.models import Algorithm, Case, CaseRun, Shard, Submission, Team, TestSet, User

    now = utcnow()
    with sessionmaker() as s:
        # spelled out here deliberately (like _setup in tests/unit/worker/test_pipeline.py): the metrics
        # asserted below count exactly these rows, so the test shows every one of them
        team = Team(name="t")
        s.add(team)
        s.flush()
        user = User(name="u", role=Role.inventor, team_id=team.id)
        algo = Algorithm(team_id=team.id, name="a")
        ts = TestSet(name="ts", protocol_name="touchstone", protocol_version="1", protocol_key="touchstone@1",
                     manifest_sha256="0" * 64, root_path="/x", time_per_case_s=10, memory_bytes=1 << 30, gpus=0,
                     shm_bytes=1 << 26, pids_limit=64, shard_size=2, quota_submissions=9, quota_period_days=7)
        s.add_all([user, algo, ts])
        s.flush()
        cases = [Case(testset_id=ts.id, case_id=f"c{i}", image_path="x", labels_path="y") for i in range(4)]
        s.add_all(cases)
        s.flush()

        def sub(state, reason=None, code=None):
            row = Submission(algorithm_id=algo.id, testset_id=ts.id, team_id=team.id, state=state,
                             failure_reason=reason, failure_code=code if with_codes else None)
            s.add(row)
            s.flush()
            return row

        running = sub(SubmissionState.running)
        sub(SubmissionState.running)
        sub(SubmissionState.scored)
        sub(SubmissionState.failed, "Validation on the public sample failed: The container exited with code 1; "
                                    "the end of its log shows the error", "nonzero_exit")
        sub(SubmissionState.failed, "Validation on the public sample failed: The container wrote unreadable or "
                                    "mis-shaped files: case c0: not a NIfTI file.", "invalid_output")
        sub(SubmissionState.failed, "Shard 0 could not be completed in 3 attempts (last: Out of memory: ...)",
            "attempts_exhausted")
        sub(SubmissionState.failed, None)
        s.add_all([
            Shard(submission_id=running.id, index=0, case_ids=["c0", "c1"], state=ShardState.running),
            Shard(submission_id=running.id, index=1, case_ids=["c2"], state=ShardState.running),
            Shard(submission_id=running.id, index=2, case_ids=["c3"], state=ShardState.failed,
                  failure_reason="Time limit exceeded: the container was still running after 30 s",
                  failure_code="time_limit" if with_codes else None),
            Shard(submission_id=running.id, index=3, case_ids=[], state=ShardState.pending),
        ])
        s.flush()
        # three case runs within the last 5 minutes, one an hour ago
        for i, age_min in enumerate((0.5, 1, 4, 60)):
            s.add(CaseRun(submission_id=running.id, case_id=cases[i].id, status="ok", wall_seconds=1.0,
                          created_at=now - dt.timedelta(minutes=age_min)))
        s.commit()


def _organizer(app) -> dict[str, str]:
    """/metrics on the API port is for organizers (services/api/routers/metrics.py)."""
    from services.db.accounts import create_user

    with app.state.sessionmaker() as session:
        _, token = create_user(session, "metrics-org", "organizer")
        session.commit()
    return {"Authorization": f"Bearer {token}"}


def test_metrics_reports_the_database_and_the_filesystem_broker(app_and_db):
    app, settings = app_and_db
    _populate(app.state.sessionmaker)
    messages = settings.broker_folder / "messages"
    messages.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (messages / f"{1000 + i}_abc{i}.gpu.msg").write_bytes(b"{}")
    (messages / "1010_def.cpu.msg").write_bytes(b"{}")
    (messages / "1011_x.other.msg").write_bytes(b"{}")  # not one of ours: not counted

    response = TestClient(app).get("/metrics", headers=_organizer(app))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = _samples(response.text)

    assert m[("touchstone_submissions", (("state", "running"),))] == 2
    assert m[("touchstone_submissions", (("state", "scored"),))] == 1
    assert m[("touchstone_submissions", (("state", "failed"),))] == 4
    assert m[("touchstone_submissions", (("state", "published"),))] == 0  # every state is present
    assert m[("touchstone_shards", (("state", "running"),))] == 2
    assert m[("touchstone_running_containers", ())] == 2
    assert m[("touchstone_case_runs_total", ())] == 4
    assert m[("touchstone_cases_per_minute", ())] == pytest.approx(3 / 5)
    assert m[("touchstone_failed_submissions", (("reason", "nonzero_exit"),))] == 1
    assert m[("touchstone_failed_submissions", (("reason", "invalid_output"),))] == 1
    assert m[("touchstone_failed_submissions", (("reason", "attempts_exhausted"),))] == 1
    assert m[("touchstone_failed_submissions", (("reason", "unknown"),))] == 1
    assert m[("touchstone_failed_shards", (("reason", "time_limit"),))] == 1
    assert m[("touchstone_queue_depth", (("queue", "gpu"),))] == 3
    assert m[("touchstone_queue_depth", (("queue", "cpu"),))] == 1
    assert m[("touchstone_scrape_errors", (("part", "database"),))] == 0
    assert m[("touchstone_scrape_errors", (("part", "broker"),))] == 0


def test_metrics_answers_when_the_database_is_gone(app_and_db):
    """A scrape must answer (and say what it could not read), not fail with 500."""
    app, settings = app_and_db

    def broken():
        raise RuntimeError("database is down")

    from services.observability import make_registry

    headers = _organizer(app)
    app.state.metrics_registry = make_registry(broken, settings, process_metrics=False)
    response = TestClient(app).get("/metrics", headers=headers)
    assert response.status_code == 200
    m = _samples(response.text)
    assert m[("touchstone_scrape_errors", (("part", "database"),))] == 1
    assert ("touchstone_submissions", (("state", "running"),)) not in m
    assert m[("touchstone_queue_depth", (("queue", "gpu"),))] == 0


def _failure_families(app) -> dict[tuple[str, tuple], float]:
    m = _samples(TestClient(app).get("/metrics", headers=_organizer(app)).text)
    return {k: v for k, v in m.items() if k[0] in ("touchstone_failed_submissions", "touchstone_failed_shards")}


def test_metrics_read_the_stored_codes_not_the_sentences(app_and_db):
    """A code stored beside a sentence is what /metrics shows, whatever the sentence says."""
    app, _ = app_and_db
    from services.db.enums import SubmissionState
    from services.db.models import Submission

    _populate(app.state.sessionmaker)
    with app.state.sessionmaker() as s:
        row = s.query(Submission).filter(Submission.failure_code == "nonzero_exit").one()
        row.failure_reason = "a sentence reworded since: time limit exceeded, out of memory"
        s.add(Submission(algorithm_id=row.algorithm_id, testset_id=row.testset_id, team_id=row.team_id,
                         state=SubmissionState.failed, failure_reason="anything", failure_code="ground_truth"))
        s.commit()
    m = _failure_families(app)
    assert m[("touchstone_failed_submissions", (("reason", "nonzero_exit"),))] == 1
    assert m[("touchstone_failed_submissions", (("reason", "ground_truth"),))] == 1
    assert ("touchstone_failed_submissions", (("reason", "time_limit"),)) not in m


def test_migration_0006_backfills_the_codes_of_older_rows(app_and_db):
    """Rows written before 0006 (sentence only): the database is put back to 0005's schema (the
    two columns dropped in place: SQLite's batch downgrade would recreate ``submissions`` and
    cascade-delete the shards) and upgraded again; each row gets its code."""
    import sqlalchemy as sa

    from services.db import migrate
    from services.db.session import dispose_engines

    app, settings = app_and_db
    _populate(app.state.sessionmaker, with_codes=False)
    dispose_engines()
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE submissions DROP COLUMN failure_code"))
        conn.execute(sa.text("ALTER TABLE shards DROP COLUMN failure_code"))
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0005_stats_policy'"))
    engine.dispose()
    # only 0006 runs again (the later migrations' tables are still there): then back to head
    migrate.upgrade("0006_failure_codes", settings.database_url)
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :head"), {"head": migrate.head_revision()})
    engine.dispose()
    m = _failure_families(app)
    assert m == {
        ("touchstone_failed_submissions", (("reason", "nonzero_exit"),)): 1,
        ("touchstone_failed_submissions", (("reason", "invalid_output"),)): 1,
        ("touchstone_failed_submissions", (("reason", "attempts_exhausted"),)): 1,
        ("touchstone_failed_submissions", (("reason", "unknown"),)): 1,  # failed without a reason
        ("touchstone_failed_shards", (("reason", "time_limit"),)): 1,
    }


def test_backfill_patterns_match_the_worker_sentences():
    """The one-time mapping of 0006 gives every FailureReason sentence the workers stored its own
    code (also under the validation prefix), and the pipeline's own sentences theirs."""
    from services.db.enums import FailureCode
    from worker.runtime.base import FailureReason

    code_of = _migration_0006().code_of
    reasons = [
        FailureReason.time_limit(30, 2), FailureReason.out_of_memory(1 << 30), FailureReason.nonzero_exit(1),
        FailureReason.no_output(), FailureReason.invalid_output("case c0: not a NIfTI file"),
        FailureReason.output_too_large(1 << 30), FailureReason.wrong_architecture("arm64"),
        FailureReason.image_too_large(50 << 30, 40 << 30), FailureReason.image_load_failed("no manifest.json"),
        FailureReason.cancelled(), FailureReason.runtime_error("docker: connection refused"),
        FailureReason.too_many_files(20000), FailureReason.output_too_deep(6),
        FailureReason.forbidden_output("a symbolic link"), FailureReason.pids_limit(512),
    ]
    for reason in reasons:
        assert code_of(reason.message, "failed") == reason.code.value, reason.message
        assert code_of(f"Validation on the public sample failed: {reason.message}", "failed") == reason.code.value
    assert code_of("No prediction for public case c0 (missing); write an output", "failed") == "no_output"
    assert code_of("Shard 2 could not be completed in 3 attempts (the worker w stopped answering)",
                   "failed") == "attempts_exhausted"
    assert code_of("Validation could not be completed (the worker running attempt 3 stopped answering, 3 "
                   "attempt(s)); this is a problem on our side", "failed") == "worker_lost"
    assert code_of("Validation could not be completed (the container engine on the worker failed, 2 "
                   "attempt(s)); this is a problem on our side", "failed") == "infrastructure"
    assert code_of("The ground truth of a hidden case cannot be used (not the submission's fault)",
                   "failed") == "ground_truth"
    assert code_of("something new", "failed") == "other"
    assert code_of(None, "failed") is None
    assert code_of("stopped by organizer o", "cancelled") == "cancelled"
    every = {code for code, _ in _migration_0006().FAILURE_PATTERNS} | {"other"}
    assert every == {c.value for c in FailureCode}  # the mapping knows every code of the one enum


def test_filesystem_depths_of_a_missing_folder(tmp_path):
    assert filesystem_queue_depths(tmp_path / "nope") == {"gpu": 0, "cpu": 0}


@pytest.mark.parametrize("fmt", ["json", "keyvalue"])
def test_structured_log_lines(fmt):
    stream = io.StringIO()
    configure_logging("worker", "INFO", fmt, stream=stream)
    try:
        logging.getLogger("touchstone.worker").info("shard %s finished", 7)
        logging.getLogger("touchstone.worker").debug("not shown at INFO")
        from services.observability import get_logger

        get_logger("touchstone.demo").info("submission scored", submission=3, state="scored")
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "touchstone"]:
            root.removeHandler(handler)
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert len(lines) == 2
    if fmt == "json":
        first, second = (json.loads(line) for line in lines)
        assert first["event"] == "shard 7 finished" and first["level"] == "info"
        assert first["service"] == "worker" and first["logger"] == "touchstone.worker"
        assert first["timestamp"].endswith("Z")
        assert second["submission"] == 3 and second["state"] == "scored"
    else:
        assert lines[0].startswith("timestamp=") and "level='info'" in lines[0]
        assert "service='worker'" in lines[0] and "event='shard 7 finished'" in lines[0]
        assert "submission=3" in lines[1]


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="TOUCHSTONE_LOG_FORMAT"):
        configure_logging("api", "INFO", "xml")
