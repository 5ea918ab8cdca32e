"""The service CLI: db upgrade/downgrade, users create (token printed once), testsets import, and
submit/status against a real server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.config import get_settings
from services.db.session import dispose_engines


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.delenv("TOUCHSTONE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "cli-data"
    dispose_engines()
    get_settings.cache_clear()


def test_db_users_testsets_commands(cli_env, manifest_csv):
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (cli_env / "touchstone.db").is_file()
    result = runner.invoke(app, ["users", "create", "olga", "--role", "organizer"])
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert token.startswith("ts_") and len(token) > 30
    bad = runner.invoke(app, ["users", "create", "ivan", "--role", "inventor"])
    assert bad.exit_code == 1 and "team" in bad.output
    result = runner.invoke(app, ["testsets", "import", "ts-cli", "--manifest", str(manifest_csv)])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "4 cases" in flat and "1 in the public sample" in flat
    again = runner.invoke(app, ["testsets", "import", "ts-cli", "--manifest", str(manifest_csv)])
    assert again.exit_code == 1 and "already exists" in " ".join(again.output.split())
    result = runner.invoke(app, ["db", "downgrade", "base"])
    assert result.exit_code == 0 and "base" in result.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_submit_and_status_against_a_server(live_server, world, image_tar, tmp_path):
    base, _ = live_server
    tar = tmp_path / "image.tar"
    tar.write_bytes(image_tar(tag="cli", layer_bytes=300_000))
    runner = CliRunner()
    token = world["tokens"]["inv_a"]
    result = runner.invoke(app, ["submit", str(tar), "--algorithm", "algo-a", "--testset", "ts1",
                                 "--api", base, "--token", token])
    assert result.exit_code == 0, result.output
    assert "received" in result.output
    submission_id = result.output.split("submission ")[1].split()[0]
    status = runner.invoke(app, ["status", submission_id, "--api", base, "--token", token])
    assert status.exit_code == 0 and "received" in status.output and "algo-a" in status.output
    duplicate = runner.invoke(app, ["submit", str(tar), "--algorithm", "algo-a", "--testset", "ts1",
                                    "--api", base, "--token", token])
    assert duplicate.exit_code == 1 and "409" in duplicate.output
    ref = runner.invoke(app, ["submit", "registry.example.org/a/b:2", "--algorithm", "algo-a", "--testset", "ts1",
                              "--api", base, "--token", token])
    assert ref.exit_code == 0, ref.output
    other = runner.invoke(app, ["status", submission_id, "--api", base, "--token", world["tokens"]["inv_b"]])
    assert other.exit_code == 1 and "404" in other.output
