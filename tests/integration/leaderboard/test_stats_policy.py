"""Issue 9 end to end: Touchstone's metadata file imports as published; the policy and options are
stored with every run, shown in the leaderboard JSON and exports, and changed by one call."""

from __future__ import annotations

import csv
import io

import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.integration.leaderboard.conftest import MODELS


def test_touchstone_metadata_policy_and_update(tmp_path, writers):
    from services.db import migrate
    from services.db.models import Aggregate, Case, TestSet
    from services.db.session import create_db_engine
    from services.db.testsets import StatisticsSettingsError, update_statistics_settings
    from services.exports import write
    from services.importers import import_touchstone
    from services.leaderboard import queries

    write_dir, _ = writers
    results = write_dir(tmp_path / "results", MODELS)
    case_ids = sorted(p.split(",")[0] for p in (results / next(iter(MODELS)) / "dsc.csv").read_text().splitlines()[1:])
    lines = ["image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;pathology;"
             "pathology_location"]
    for i, c in enumerate(case_ids + ["s9999"]):  # s9999: no result -> reported, skipped
        lines.append(f"{c};{40 + i}.00;{'mf'[i % 2]};{'IC'[i % 2]};ct abdomen;test;siemens;emotion 16;"
                     f"{(100, 120)[i % 2]};tumor;abdomen")
    meta = tmp_path / "metaTotalSeg.csv"
    meta.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade("head", url)
    engine = create_db_engine(url)
    with Session(engine) as session:
        report = import_touchstone(session, results, "ts", metadata=meta)
        assert any("institute -> hospital" in line for line in report.metadata)
        assert any("kept as extra metadata" in line and "kvp" in line for line in report.metadata)
        assert len(report.metadata_skipped) == 1 and "s9999" in report.metadata_skipped[0]
        testset = session.scalar(sa.select(TestSet).where(TestSet.name == "ts"))
        assert testset.missing_policy == "common"
        case = session.scalar(sa.select(Case).where(Case.case_id == case_ids[0]))
        assert (case.hospital, case.sex, case.age, case.extra["kvp"]) == ("I", "m", 40, "100")
        board = queries.leaderboard(session, testset, scope="all")
        assert board["missing_policy"] == "common" and "missing cases: common" in board["statistics"]
        assert len({e["n"] for e in board["entries"]}) == 1  # one n on every row under "common"
        sexes = {a.group_value for a in session.scalars(sa.select(Aggregate).where(Aggregate.scope == "sex"))}
        assert sexes == {"m", "f"}
        try:
            update_statistics_settings(session, testset, subgroup_variables=["nope"])
            raise AssertionError("unknown column accepted")
        except StatisticsSettingsError as exc:
            assert "kvp" in str(exc)
        update_statistics_settings(session, testset, missing_policy="worst", stats_preset="touchstone-2024",
                                   subgroup_variables=["kvp", "study_type"], stats_options={"ci_method": "bca"})
        session.commit()
        board = queries.leaderboard(session, testset, scope="all")
        assert board["missing_policy"] == "worst" and "preset touchstone-2024" in board["statistics"]
        assert board["run"]["wilcoxon"] == {"zero_method": "wilcox", "continuity": False, "method": "auto"}
        kvp = list(session.scalars(sa.select(Aggregate).where(Aggregate.scope == "kvp")))
        assert {a.group_value for a in kvp} == {"100", "120"} and all(a.ci_method == "bca" for a in kvp)
        assert all(a.too_small == (a.n < testset.min_group_size) for a in kvp)
        out = io.BytesIO()
        write(session, testset, "subgroup", "csv", out, "all")
        rows = list(csv.DictReader(io.StringIO(out.getvalue().decode())))
        assert rows and {r["variable"] for r in rows} == {"kvp", "study_type"}
        assert all(r["missing_policy"] == "worst" and "touchstone-2024" in r["statistics"] for r in rows)
        assert {"too_small", "ci_method"} <= set(rows[0])
    engine.dispose()


def test_page_and_cli_name_the_policy_and_mark_incomplete_baselines(tmp_path, writers, monkeypatch):
    """A published model that lacks cases is marked on the page and in the CLI; the page, the
    submission page and `touchstone stats` name the protocol, missing-case policy, tie rule and
    test options under their tables."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from services.api.app import create_app
    from services.cli.main import app as cli
    from services.config import Settings, get_settings
    from services.db import migrate

    write_dir, _ = writers
    results = write_dir(tmp_path / "results", {"Full": 0.85, "Partial": 0.80}, n_cases=24)
    for metric in ("dsc", "nsd"):  # Partial lacks its last 4 cases, as published folders sometimes do
        path = results / "Partial" / f"{metric}.csv"
        path.write_text("\n".join(path.read_text().splitlines()[:-4]) + "\n")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade("head", url)
    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", url)
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        imported = runner.invoke(cli, ["results", "import-touchstone", str(results), "--testset", "pub"])
        assert imported.exit_code == 0, imported.output
        board = runner.invoke(cli, ["leaderboard", "pub", "--format", "json"])
        assert board.exit_code == 0, board.output
        import json

        entries = {e["label"]: e for e in json.loads(board.stdout)["entries"]}
        assert entries["Partial"]["incomplete"] is True and entries["Full"]["incomplete"] is False
        table = runner.invoke(cli, ["leaderboard", "pub"], terminal_width=400)
        assert "missing cases: common" in " ".join(table.output.split())
        stats = runner.invoke(cli, ["stats", "pub", "--organ", "liver"], terminal_width=400)
        assert stats.exit_code == 0 and "missing cases: common" in " ".join(stats.output.split())
        with TestClient(create_app(Settings(database_url=url, data_dir=tmp_path / "data"))) as client:
            page = client.get("/leaderboards/pub")
            assert page.status_code == 200
            assert 'id="statistics"' in page.text and "missing cases: common" in page.text
            assert "tie" in page.text.split('id="statistics"')[1].split("</p>")[0]
            assert page.text.count('class="badge incomplete"') == 1
    finally:
        get_settings.cache_clear()
