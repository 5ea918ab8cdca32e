"""POST /testsets reads server paths only inside settings.import_roots, and every refusal looks the
same as a missing file -- against a real server whose SQLite database lies in the data directory:
naming the database (any spelling) must neither answer differently nor open the file (SQLite drops
its POSIX locks when any descriptor of the file is closed)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import httpx
import pytest

from services.config import Settings
from services.db import migrate


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    """The embedded layout: the SQLite database inside the data directory (PostgreSQL: as given)."""
    data = tmp_path / "data"
    data.mkdir()
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{data / 'touchstone.db'}"
        migrate.upgrade("head", database_url)
    return Settings(data_dir=data, database_url=database_url, max_upload_bytes=1024 * 1024,
                    import_roots=[tmp_path / "testset", tmp_path / "other"])


def _refusal(field: str, given: str) -> str:
    from services.db.testsets import refused_message

    return refused_message(field, given=given)


def _spellings(settings: Settings, tmp_path: Path) -> list[str]:
    data = Path(settings.data_dir)
    root = tmp_path / "testset"
    link = root / "db-link.csv"
    hard_target = data / "touchstone.db"
    spellings = [
        str(root / "missing.csv"),  # the reference: a file that does not exist
        str(data / "touchstone.db"),
        str(data / "." / "touchstone.db"),
        f"{data}//touchstone.db",
        str(root / ".." / "data" / "touchstone.db"),
        str(root / ".." / "data" / "touchstone.db-wal"),
        str(link),  # a link inside the root pointing at the database
        str(root),  # a folder
        str(root / "binary.csv"),  # binary content
        str(root / "nul.csv"),  # NUL bytes
        str(tmp_path / "outside.csv"),  # a readable manifest outside the roots
        "relative/manifest.csv",
        str(root / "manifest.csv") + "\x00.txt",
        str(data / "storage"),
    ]
    if os.geteuid() != 0:  # root reads a file of mode 000
        spellings.append(str(root / "unreadable.csv"))
    if hard_target.exists() and settings.is_sqlite:
        link.symlink_to(hard_target)
    else:
        link.symlink_to(data / "nothing")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (root / "nul.csv").write_bytes(b"case_id,image,labels,hospital\n\x00a,b,c,d\n")
    (tmp_path / "outside.csv").write_text((root / "manifest.csv").read_text())
    (root / "unreadable.csv").write_text("case_id,image,labels,hospital\n")
    os.chmod(root / "unreadable.csv", 0)
    return spellings


def test_the_database_and_other_refusals_look_like_a_missing_file(live_server, world, settings, tmp_path):
    base, _ = live_server
    org = world["headers"]["org"]
    answers = {}
    for i, path in enumerate(_spellings(settings, tmp_path)):
        response = httpx.post(f"{base}/api/v1/testsets", headers=org, json={"name": f"probe{i}", "manifest_path": path})
        answers[path] = (response.status_code, response.json()["detail"])
    for path, (status, detail) in answers.items():
        assert status == 422, (path, detail)
        assert detail == _refusal("manifest_path", path), (path, detail)
    # a protocol file is a server path too
    response = httpx.post(f"{base}/api/v1/testsets", headers=org, json={
        "name": "proto", "manifest_path": str(tmp_path / "testset" / "manifest.csv"),
        "protocol": str(Path(settings.data_dir) / "touchstone.db")})
    assert response.status_code == 422 and response.json()["detail"].startswith("protocol: no readable protocol file")

    # the server's database still works, and another process/connection sees what it writes next
    created = httpx.post(f"{base}/api/v1/teams", headers=org, json={"name": "after-probes"})
    assert created.status_code == 201, created.text
    if settings.is_sqlite:
        db = Path(settings.data_dir) / "touchstone.db"
        assert db.exists() and Path(f"{db}-wal").exists()
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM teams WHERE name = 'after-probes'").fetchone()[0] == 1
    teams = httpx.get(f"{base}/api/v1/teams", headers=org).json()
    assert "after-probes" in {t["name"] for t in teams}


def test_a_manifest_naming_files_outside_the_roots_is_refused(live_server, world, settings, tmp_path):
    base, _ = live_server
    org = world["headers"]["org"]
    root = tmp_path / "testset"
    text = (root / "manifest.csv").read_text().splitlines()
    # case0's image becomes the database (absolute), case1's labels escape with ..
    text[1] = text[1].replace("case0/ct.nii.gz", str(Path(settings.data_dir) / "touchstone.db"), 1)
    text[2] = text[2].replace("case1/segmentations", "../data", 1)
    evil = root / "evil.csv"
    evil.write_text("\n".join(text) + "\n")
    response = httpx.post(f"{base}/api/v1/testsets", headers=org, json={"name": "evil", "manifest_path": str(evil)})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "case 'case0', column image" in detail and "case 'case1', column labels" in detail
    assert "TOUCHSTONE_IMPORT_ROOTS" in detail


def test_a_manifest_inside_a_root_imports(live_server, world, settings, tmp_path):
    base, _ = live_server
    response = httpx.post(f"{base}/api/v1/testsets", headers=world["headers"]["org"],
                          json={"name": "ok", "manifest_path": str(tmp_path / "testset" / "manifest.csv")})
    assert response.status_code == 201, response.text
    assert response.json()["n_cases"] == 4


def test_a_root_that_holds_the_data_directory_is_not_used(tmp_path):
    from services.db.testsets import PathRefused, confine_path, usable_import_roots

    data = tmp_path / "data"
    (data / "storage").mkdir(parents=True)
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "m.csv").write_text("x")
    (data / "storage" / "m.csv").write_text("x")
    settings = Settings(data_dir=data, import_roots=[tmp_path, data / "storage", tmp_path / "ok"])
    assert usable_import_roots(settings) == [os.path.realpath(tmp_path / "ok")]
    assert confine_path(tmp_path / "ok" / "m.csv", settings) == (tmp_path / "ok" / "m.csv").resolve()
    with pytest.raises(PathRefused):
        confine_path(data / "storage" / "m.csv", settings)
    # a hard link to the database inside a root is the database
    db = data / "touchstone.db"
    db.write_bytes(b"SQLite format 3\x00")
    os.link(db, tmp_path / "ok" / "hard.csv")
    with pytest.raises(PathRefused):
        confine_path(tmp_path / "ok" / "hard.csv", settings)
    # no roots configured: nothing is readable
    with pytest.raises(PathRefused):
        confine_path(tmp_path / "ok" / "m.csv", Settings(data_dir=data))
