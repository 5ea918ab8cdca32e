"""A small leaderboard world shared by the leaderboard integration tests (module scope, SQLite
file migrated by Alembic): three imported Touchstone baselines, one scored-but-unpublished
submission of team Alpha (with measured efficiency), users of every role with tokens."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from evaluation.labels import ORGANS

N_CASES = 24
MODELS = {"MedNeXt": 0.80, "nnU-Net": 0.84, "SwinUNETR": 0.78}


def write_touchstone_dir(root: Path, models: dict[str, float], n_cases: int = N_CASES, seed: int = 0) -> Path:
    """One folder per model with dsc.csv and nsd.csv; case 3's gall_bladder left empty (not scored)."""
    rng = np.random.default_rng(seed)
    for name, level in models.items():
        folder = root / name
        folder.mkdir(parents=True)
        for metric, shift in (("dsc", 0.0), ("nsd", 0.03)):
            with open(folder / f"{metric}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["name", *ORGANS])
                for i in range(n_cases):
                    row = [f"BDMAP_{i:08d}"]
                    for organ in ORGANS:
                        if i == 3 and organ == "gall_bladder":
                            row.append("")
                        else:
                            row.append(f"{float(np.clip(level + shift + rng.normal(0, 0.04), 0, 1)):.5f}")
                    writer.writerow(row)
    return root


def write_metadata(path: Path, n_cases: int = N_CASES) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "hospital", "age", "sex", "manufacturer"])
        for i in range(n_cases):
            writer.writerow([f"BDMAP_{i:08d}", f"hospital-{'ABC'[i % 3]}", 25 + 2 * i, "FM"[i % 2],
                             "GE" if i < 12 else "Siemens"])
    return path


@dataclass
class World:
    url: str
    testset: str
    tokens: dict[str, str]
    baseline_ids: list[int]
    alpha_id: int
    root: Path

    def headers(self, who: str | None) -> dict[str, str]:
        return {} if who is None else {"Authorization": f"Bearer {self.tokens[who]}"}


def use_database(monkeypatch: pytest.MonkeyPatch, url: str, data_dir: Path) -> None:
    from services.config import get_settings

    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", url)
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(data_dir))
    get_settings.cache_clear()


def build_world(url: str, root: Path) -> World:
    from services.db import migrate
    from services.db.accounts import create_user
    from services.db.enums import Role, ShardState, SubmissionState
    from services.db.models import Algorithm, Case, CaseRun, Score, Shard, Submission, Team, TestSet
    from services.db.session import create_db_engine
    from services.importers import import_touchstone
    from services.leaderboard import on_submission_scored
    from sqlalchemy.orm import Session

    migrate.upgrade("head", url)
    engine = create_db_engine(url)
    tokens = {}
    with Session(engine) as session:
        for name, role, team in (("org", Role.organizer, None), ("alice", Role.inventor, "Alpha"),
                                 ("bob", Role.inventor, "Beta"), ("ana", Role.analyst, None)):
            _, tokens[name] = create_user(session, name, role, team)
        report = import_touchstone(session, write_touchstone_dir(root / "results", MODELS), "abdomen-ct",
                                   metadata=write_metadata(root / "meta.csv"))
        testset = session.scalar(sa.select(TestSet).where(TestSet.name == "abdomen-ct"))
        team = session.scalar(sa.select(Team).where(Team.name == "Alpha"))
        algorithm = Algorithm(team_id=team.id, name="AlphaSeg")
        session.add(algorithm)
        session.flush()
        submission = Submission(algorithm_id=algorithm.id, testset_id=testset.id, team_id=team.id,
                                state=SubmissionState.scored, image_digest="sha256:" + "ab" * 32,
                                image_sha256="cd" * 32)
        session.add(submission)
        session.flush()
        shard = Shard(submission_id=submission.id, index=0, case_ids=[], state=ShardState.succeeded,
                      gpu_memory_peak_bytes=3 * 1024**3, peak_memory_bytes=5 * 1024**3)
        session.add(shard)
        session.flush()
        rng = np.random.default_rng(7)
        cases = list(session.scalars(sa.select(Case).where(Case.testset_id == testset.id).order_by(Case.case_id)))
        for index, case in enumerate(cases):
            session.add(CaseRun(submission_id=submission.id, case_id=case.id, shard_id=shard.id,
                                wall_seconds=10.0 + index, status="ok"))
            for organ in ORGANS:
                failed = index == 0 and organ == "liver"  # one failed prediction, scored with the worst value
                session.add(Score(submission_id=submission.id, case_id=case.id, organ=organ,
                                  protocol_key=testset.protocol_key,
                                  dsc=0.0 if failed else float(np.clip(0.88 + rng.normal(0, 0.03), 0, 1)),
                                  nsd=0.0 if failed else float(np.clip(0.9 + rng.normal(0, 0.03), 0, 1)),
                                  status="missing_prediction" if failed else "ok"))
        # a public-sample case (the inventors' validation run): never part of the benchmark's
        # statistics, so no submission may count it as missing (n_missing / n below)
        session.add(Case(testset_id=testset.id, case_id="public_00001", hospital="hospital-A", public_sample=True,
                         image_path="public/ct.nii.gz", labels_path="public/segmentations"))
        session.flush()
        on_submission_scored(session, submission.id)
        session.commit()
        world = World(url=url, testset="abdomen-ct", tokens=tokens, baseline_ids=report.submission_ids,
                      alpha_id=submission.id, root=root)
    engine.dispose()
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("leaderboard")
    url = f"sqlite:///{root / 'touchstone.db'}"
    mp = pytest.MonkeyPatch()
    use_database(mp, url, root / "data")
    try:
        yield build_world(url, root)
    finally:
        mp.undo()
        from services.config import get_settings

        get_settings.cache_clear()


@pytest.fixture(scope="module")
def client(world):
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.config import Settings

    app = create_app(Settings(database_url=world.url, data_dir=world.root / "data"))
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture()
def session(world):
    from sqlalchemy.orm import Session

    from services.db.session import create_db_engine

    engine = create_db_engine(world.url)
    with Session(engine) as s:
        yield s
    engine.dispose()


@pytest.fixture(scope="module")
def writers():
    """(write_touchstone_dir, write_metadata) for tests that build their own folders."""
    return write_touchstone_dir, write_metadata


@pytest.fixture()
def world_builder():
    """build_world(url, root) for tests on another database (PostgreSQL)."""
    return build_world


@pytest.fixture()
def cli_env(world, monkeypatch):
    """The CLI's settings pointed at the world's database (commands run in this process)."""
    from services.config import get_settings

    monkeypatch.setenv("TOUCHSTONE_DATABASE_URL", world.url)
    monkeypatch.setenv("TOUCHSTONE_DATA_DIR", str(world.root / "data"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
