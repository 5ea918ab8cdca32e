"""`touchstone results import-touchstone`: a generated Touchstone-format folder, errors, re-import."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from services.cli.main import app as cli


@pytest.fixture()
def db(tmp_path, monkeypatch):
    from services.config import get_settings
    from services.db import migrate

    url = f"sqlite:///{tmp_path / 'import.db'}"
    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", url)
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    migrate.upgrade("head", url)
    yield url
    get_settings.cache_clear()


def _count(url, model):
    engine = sa.create_engine(url)
    with engine.connect() as c:
        n = c.scalar(sa.select(sa.func.count()).select_from(model))
    engine.dispose()
    return n


def test_import_creates_cases_baselines_and_statistics(db, tmp_path, writers):
    write_touchstone_dir, write_metadata = writers
    from services.db.leaderboard_models import RankingEntry
    from services.db.models import Case, Score, Submission

    folder = write_touchstone_dir(tmp_path / "res", {"A": 0.8, "B": 0.85}, n_cases=6)
    meta = write_metadata(tmp_path / "meta.csv", n_cases=6)
    runner = CliRunner()
    result = runner.invoke(cli, ["results", "import-touchstone", str(folder), "--testset", "ts1", "--metadata", str(meta)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "imported 2 model(s)" in text and "6 case(s) created" in text
    assert _count(db, Case) == 6 and _count(db, Submission) == 2
    assert _count(db, Score) == 2 * (6 * 9 - 1)  # one empty cell per model
    assert _count(db, RankingEntry) > 0
    engine = sa.create_engine(db)
    with engine.connect() as c:
        states = c.execute(sa.select(Submission.state, Submission.is_baseline, Submission.counts_against_quota)).all()
        hospitals = c.scalars(sa.select(Case.hospital).order_by(Case.case_id)).all()
    engine.dispose()
    assert {tuple(s) for s in states} == {("published", True, False)}
    assert hospitals[:3] == ["hospital-A", "hospital-B", "hospital-C"]
    # importing again replaces, never duplicates
    result = runner.invoke(cli, ["results", "import-touchstone", str(folder), "--testset", "ts1"])
    assert result.exit_code == 0, result.output
    assert _count(db, Submission) == 2 and _count(db, Score) == 2 * (6 * 9 - 1)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text(p.read_text().replace("pancreas", "pancreaz")), "missing column(s) pancreas"),
        (lambda p: p.write_text(p.read_text().replace(p.read_text().splitlines()[3].split(",")[2], "n/a", 1)),
         "row 4, column gall_bladder: 'n/a' is not a number"),
        (lambda p: p.write_text(p.read_text().replace(p.read_text().splitlines()[2].split(",")[1], "1.7", 1)),
         "row 3, column aorta: 1.7 is outside [0, 1]"),
        (lambda p: p.unlink(), "lacks nsd.csv"),
    ],
)
def test_malformed_files_are_refused_and_nothing_is_stored(db, tmp_path, damage, message, writers):
    write_touchstone_dir = writers[0]
    from services.db.models import Score, Submission, TestSet

    folder = write_touchstone_dir(tmp_path / "res", {"A": 0.8, "B": 0.85}, n_cases=5)
    damage(folder / "B" / "nsd.csv")
    result = CliRunner().invoke(cli, ["results", "import-touchstone", str(folder), "--testset", "ts1"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert message in text and "nothing was imported" in text, text
    assert "Traceback" not in result.output
    assert _count(db, TestSet) == 0 and _count(db, Submission) == 0 and _count(db, Score) == 0


def test_empty_folder_and_wrong_level(db, tmp_path, writers):
    write_touchstone_dir = writers[0]
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["results", "import-touchstone", str(tmp_path / "empty"), "--testset", "x"])
    assert result.exit_code == 1 and "no model folder" in " ".join(result.output.split())
    one = write_touchstone_dir(tmp_path / "one", {"A": 0.8}, n_cases=3) / "A"
    result = CliRunner().invoke(cli, ["results", "import-touchstone", str(one), "--testset", "x"])
    assert result.exit_code == 1 and "give its parent folder" in " ".join(result.output.split())


def test_baseline_log_names_no_server_path(db, tmp_path, writers):
    """The imported baseline's log is read by its team: it names the model folder, not where the
    organizer keeps it (that is in the audit log, which only organizers read)."""
    write_touchstone_dir, _ = writers
    from services.db.models import AuditLog, Submission

    folder = write_touchstone_dir(tmp_path / "organizer-secret-dir" / "res", {"A": 0.8}, n_cases=3)
    result = CliRunner().invoke(cli, ["results", "import-touchstone", str(folder), "--testset", "ts1"])
    assert result.exit_code == 0, result.output
    engine = sa.create_engine(db)
    with engine.connect() as c:
        logs = c.scalars(sa.select(Submission.validation_log)).all()
        audit = c.scalars(sa.select(AuditLog.details)).all()
    engine.dispose()
    assert logs and all("imported from A/" in log for log in logs)
    assert not any(str(tmp_path) in log or "organizer-secret-dir" in log for log in logs)
    assert any(str(folder) in str(details) for details in audit)
