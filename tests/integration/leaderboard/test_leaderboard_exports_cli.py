"""Exports (API and CLI, CSV and Parquet, streamed) and the CLI printing what the API returns."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from services.cli.main import app as cli
from services.exports import COLUMNS

EXPORTS = "/api/v1/exports/abdomen-ct"


def _n_scores(session, ids):
    from services.db.models import Score

    return session.scalar(sa.select(sa.func.count(Score.id)).where(Score.submission_id.in_(ids)))


@pytest.mark.parametrize("who, status", [(None, 401), ("alice", 403), ("ana", 200), ("org", 200)])
def test_export_visibility(world, client, who, status):
    assert client.get(EXPORTS, params={"level": "hospital"}, headers=world.headers(who)).status_code == status
    if who == "ana":
        response = client.get(EXPORTS, params={"scope": "all"}, headers=world.headers(who))
        assert response.status_code == 403


def test_case_export_csv_streams_every_published_score(world, client, session):
    # analysts: the public-sample cases only (none scored in this world): hidden per-case scores
    # stay with the organizers
    with client.stream("GET", EXPORTS, params={"level": "case"}, headers=world.headers("ana")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        body = b"".join(response.iter_bytes()).decode()
    assert body.strip().split(",") == COLUMNS["case"]
    # organizers (scope=all, their view): every score of the hidden cases, published or not
    with client.stream("GET", EXPORTS, params={"level": "case", "scope": "all"},
                       headers=world.headers("org")) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_bytes()).decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert list(rows[0].keys()) == COLUMNS["case"]
    assert len(rows) == _n_scores(session, world.baseline_ids + [world.alpha_id])
    published = [r for r in rows if r["state"] == "published"]
    assert len(published) == _n_scores(session, world.baseline_ids)  # Alpha is scored, not published
    rows = published
    assert {r["protocol_key"] for r in rows} == {"touchstone@1"}
    assert all(len(r["image_sha256"]) == 64 for r in rows)
    assert {r["hospital"] for r in rows} == {"hospital-A", "hospital-B", "hospital-C"}


def test_parquet_exports_in_row_groups(world, session, tmp_path):
    from services import exports
    from services.db.models import TestSet

    ts = session.scalar(sa.select(TestSet).where(TestSet.name == "abdomen-ct"))
    path = tmp_path / "cases.parquet"
    chunks = list(exports.stream_parquet(session, ts, "case", scope="all", row_group=100))
    assert len(chunks) > 5  # handed on group by group, not as one blob
    path.write_bytes(b"".join(chunks))
    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow.names == COLUMNS["case"]
    assert parquet.metadata.num_row_groups == parquet.metadata.num_rows // 100 + (parquet.metadata.num_rows % 100 > 0)
    table = parquet.read()
    assert table.num_rows == _n_scores(session, world.baseline_ids + [world.alpha_id])
    digests = set(table.column("image_digest").to_pylist())
    assert "sha256:" + "ab" * 32 in digests
    assert parquet.schema_arrow.metadata[b"touchstone.protocol_key"] == b"touchstone@1"


def test_cli_export_subgroup_and_hospital(world, cli_env, tmp_path):
    runner = CliRunner()
    out = tmp_path / "sub.parquet"
    result = runner.invoke(cli, ["export", "abdomen-ct", "--level", "subgroup", "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.names == COLUMNS["subgroup"]
    assert set(table.column("variable").to_pylist()) == {"age_decade", "sex", "manufacturer"}
    out_csv = tmp_path / "hosp.csv"
    result = runner.invoke(cli, ["export", "abdomen-ct", "--level", "hospital", "--out", str(out_csv)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out_csv)))
    # 3 baselines x 3 hospitals x 10 organs (incl. average) x 2 metrics
    assert len(rows) == 3 * 3 * 10 * 2 and {r["variable"] for r in rows} == {"hospital"}
    result = runner.invoke(cli, ["export", "abdomen-ct", "--level", "pixel", "--out", str(out_csv)])
    assert result.exit_code == 1 and "unknown level 'pixel'" in result.output


@pytest.mark.parametrize("method", ["mean", "test"])
def test_cli_leaderboard_json_equals_api(world, client, cli_env, method):
    result = CliRunner().invoke(cli, ["leaderboard", "abdomen-ct", "--organ", "pancreas", "--metric", "nsd",
                                      "--method", method, "--format", "json"])
    assert result.exit_code == 0, result.output
    api = client.get("/api/v1/leaderboards/abdomen-ct",
                     params={"organ": "pancreas", "metric": "nsd", "method": method}).json()
    assert json.loads(result.stdout) == api


def test_cli_stats_json_equals_api_and_table_prints(world, client, cli_env):
    runner = CliRunner()
    result = runner.invoke(cli, ["stats", "abdomen-ct", "--organ", "liver", "--format", "json", "--scope", "all"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    headers = world.headers("org")
    assert payload["significance"] == client.get("/api/v1/leaderboards/abdomen-ct/significance",
                                                 params={"organ": "liver", "scope": "all"}, headers=headers).json()
    assert payload["stability"] == client.get("/api/v1/leaderboards/abdomen-ct/stability",
                                              params={"organ": "liver", "scope": "all"}, headers=headers).json()
    table = runner.invoke(cli, ["stats", "abdomen-ct", "--organ", "liver"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "nnU-Net" in table.stdout and "holm-adjusted" in table.stdout
    board = runner.invoke(cli, ["leaderboard", "abdomen-ct", "--format", "csv"])
    lines = board.stdout.strip().splitlines()
    assert lines[0].startswith("rank,label,team,value,mean") and len(lines) == 4
    bad = runner.invoke(cli, ["leaderboard", "nope"])
    assert bad.exit_code == 1 and "no test set named 'nope'" in bad.output
