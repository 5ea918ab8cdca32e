"""Fixtures of the pipeline tests: a real database, a real broker, real Celery worker processes
(started exactly as ``touchstone worker`` starts them) and the real Docker engine.

A :class:`Stack` is one deployment: a data folder, a database, a broker URL and the worker
processes. Submissions go in through the functions the API calls (storage streaming, the tarball
check, ``services.submissions.record``, ``services.queue.enqueue_validation``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[3]
SLOW_IMAGE = "touchstone/test-slow-algorithm:latest"
EXAMPLES = ("classical", "trivial", "sleep-forever", "exit-1", "oom", "garbage", "nothing", "network", "forkbomb",
            "deep-writer", "many-files", "sigterm-spinner")
FINISHED = {"scored", "failed", "cancelled"}

#: worker knobs for tests: short start-up allowance, fast heartbeat and reaper
TEST_WORKER_ENV = {
    "TOUCHSTONE_WORKER_STARTUP_S": "3",
    "TOUCHSTONE_WORKER_CONTAINER_CPUS": "1",
    "TOUCHSTONE_WORKER_HEARTBEAT_S": "1",
    "TOUCHSTONE_WORKER_STALE_AFTER_S": "6",
    "TOUCHSTONE_WORKER_REAP_INTERVAL_S": "2",
    "TOUCHSTONE_WORKER_SCORE_BATCH_SIZE": "2",
    "TOUCHSTONE_WORKER_CANCEL_POLL_S": "0.5",
    "TOUCHSTONE_WORKER_VISIBILITY_TIMEOUT_S": "60",
}


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def example_images(docker_client, base_image) -> dict[str, str]:
    """Every example algorithm built once per session (scripts/build-examples.sh; the layer cache
    makes a rebuild cheap), plus the slowed test algorithm."""
    env = {**os.environ, "TOUCHSTONE_BASE_IMAGE": base_image}
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), base_image, "--only", ",".join(EXAMPLES)],
                   check=True, env=env, capture_output=True, timeout=900)
    docker_client.images.build(path=str(Path(__file__).parent / "slow_algorithm"), tag=SLOW_IMAGE,
                               buildargs={"BASE_IMAGE": base_image}, rm=True)
    return {name: f"touchstone/example-{name}:latest" for name in EXAMPLES} | {"slow": SLOW_IMAGE}


@pytest.fixture(scope="session")
def classical_tarball(example_images, docker_client, tmp_path_factory) -> Path:
    """``docker save`` of the classical segmenter: the file an inventor uploads."""
    path = tmp_path_factory.mktemp("tarballs") / "classical.tar"
    with open(path, "wb") as handle:
        for chunk in docker_client.images.get(example_images["classical"]).save(named=True):
            handle.write(chunk)
    return path


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """7 tiny phantom cases, 1 of them public."""
    from evaluation.phantoms import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), 7, public_sample=1, size="tiny", seed=3)


# ------------------------------------------------------------------------------------------------
# databases and brokers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def pg_database(new_postgres_database) -> Iterator[str]:
    """A fresh PostgreSQL database of our own on the test server (dropped afterwards)."""
    with new_postgres_database("ts_pipeline") as url:
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own (persistent: appendonly), which the test may restart."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.process.wait(timeout=20)


@pytest.fixture
def own_redis(redis_url, tmp_path) -> Iterator[RedisServer]:
    """A Redis server on a free port (needs the same redis-server the shared fixture checks)."""
    server = RedisServer(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------
# the deployment
# ------------------------------------------------------------------------------------------------
@dataclass
class Stack:
    data_dir: Path
    database_url: str
    broker_url: str
    env: dict[str, str]
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_files: list[Path] = field(default_factory=list)

    # -- workers ------------------------------------------------------------------------------
    def start_workers(self, queues: tuple[str, ...] = ("gpu", "cpu"), name: str = "w") -> list[subprocess.Popen]:
        """Start the Celery workers ``touchstone worker`` would start, each in its own process group."""
        from services.cli.worker import celery_commands

        started = []
        for command in celery_commands(list(queues), [], concurrency=2, beat="cpu" in queues,
                                       loglevel="INFO", data_dir=self.data_dir):
            log = self.data_dir / f"worker-{name}-{command.name}-{len(self.log_files)}.log"
            self.log_files.append(log)
            process = subprocess.Popen(command.argv, cwd=ROOT, env={**os.environ, **self.env, **command.env},
                                       stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
            started.append(process)
        self.workers.extend(started)
        return started

    def kill(self, processes: list[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        for process in processes:
            if process.poll() is None:
                try:
                    if sig == signal.SIGKILL:
                        os.killpg(process.pid, sig)  # the whole process group: a machine that died
                    else:
                        process.send_signal(sig)  # Celery's main process shuts its pool down itself
                except ProcessLookupError:
                    pass
        for process in processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # no pool process may outlive its worker
            except ProcessLookupError:
                pass
            if process in self.workers:
                self.workers.remove(process)

    def containers(self, docker_client, submission_id: int, running: bool = False, shard: str | None = None) -> list:
        """Containers of this stack's submission: found by label, and by a mount in this stack's
        data folder (other test runs on the engine reuse submission ids)."""
        labels = [f"touchstone.submission={submission_id}"] + ([f"touchstone.shard={shard}"] if shard else [])
        filters = {"label": labels} | ({"status": "running"} if running else {})
        found = []
        for container in docker_client.containers.list(all=not running, filters=filters):
            mounts = container.attrs.get("Mounts") or []
            if any(str(m.get("Source", "")).startswith(str(self.data_dir)) for m in mounts):
                found.append(container)
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in self.log_files if p.exists())

    # -- data -----------------------------------------------------------------------------------
    def add_testset(self, name: str, manifest: Path, **limits) -> None:
        from services.config import get_settings
        from services.db.models import TestSet
        from services.db.session import session_scope
        from services.db.testsets import import_testset

        with session_scope() as session:
            testset = import_testset(session, name, manifest, protocol="touchstone", settings=get_settings())
            values = {"time_per_case_s": 30.0, "memory_bytes": 1 << 30, "gpus": 0, "shm_bytes": 64 << 20,
                      "pids_limit": 128, "shard_size": 3, "quota_submissions": 1000}
            values.update(limits)
            for key, value in values.items():
                setattr(testset, key, value)
            assert isinstance(testset, TestSet)

    def _people(self, session, algorithm: str):
        from services.db.enums import Role
        from services.db.models import Algorithm, Team, User

        team = session.scalar(sa.select(Team).where(Team.name == "pipeline-team"))
        if team is None:
            team = Team(name="pipeline-team")
            session.add(team)
            session.flush()
            session.add(User(name="pipeline-inventor", role=Role.inventor, team_id=team.id))
            session.flush()
        user = session.scalar(sa.select(User).where(User.name == "pipeline-inventor"))
        algo = Algorithm(team_id=team.id, name=algorithm)
        session.add(algo)
        session.commit()
        return user, algo

    @staticmethod
    def _owned_digest(session, team_id: int, local_image: str) -> str:
        """The digest of a locally built example image, recorded as uploaded by the team before
        (what a validated tarball upload leaves behind), so the test can submit it by digest
        without a ``docker save`` of ~1 GB per example. Image ownership itself (a tag or another
        team's digest is refused) is tested in tests/integration/services/test_image_ownership*.py."""
        import docker

        from services.db.enums import SubmissionState
        from services.db.models import Submission

        image_id = docker.from_env().images.get(local_image).id
        owned = session.scalar(sa.select(Submission.id).where(
            Submission.team_id == team_id, Submission.image_digest == image_id,
            Submission.image_sha256.is_not(None)).limit(1))
        if owned is None:
            algo_id = session.scalar(sa.text("select id from algorithms where team_id = :t order by id limit 1"),
                                     {"t": team_id})
            testset_id = session.scalar(sa.text("select id from testsets order by id limit 1"))
            session.add(Submission(algorithm_id=algo_id, testset_id=testset_id, team_id=team_id,
                                   state=SubmissionState.cancelled, image_sha256="0" * 64, image_digest=image_id,
                                   counts_against_quota=False))
            session.commit()
        return image_id

    def submit(self, testset: str, *, image_ref: str | None = None, tarball: Path | None = None,
               algorithm: str | None = None) -> int:
        """Submit as the API does: stream the tarball into storage and check it, record the
        submission (quota, duplicates), enqueue validation."""
        from services import queue
        from services import submissions
        from services.api import intake
        from services.db.session import get_sessionmaker
        from services.storage import Storage

        image_path = sha256 = size = None
        if tarball is not None:
            storage = Storage.from_settings()
            image_path = f"uploads/test/{uuid.uuid4().hex}.tar"

            def chunks():
                with open(tarball, "rb") as handle:
                    while block := handle.read(1 << 22):
                        yield block

            size, sha256 = storage.save_stream(chunks(), image_path)
            intake.check_docker_save_tar(storage.path(image_path))
        with get_sessionmaker()() as session:
            user, algo = self._people(session, algorithm or f"algo-{uuid.uuid4().hex[:8]}")
            testset_row = intake.find_testset(session, testset)
            if image_ref is not None and not image_ref.startswith("sha256:"):
                image_ref = self._owned_digest(session, algo.team_id, image_ref)
            submission = submissions.record(session, user, algo, testset_row, image_path=image_path,
                                            image_sha256=sha256, image_size=size, image_ref=image_ref)
        queue.enqueue_validation(submission.id)
        return submission.id

    def wait(self, submission_id: int, until: set[str] = FINISHED, timeout: float = 180,
             seen: list[str] | None = None) -> dict:
        """Poll the submission until its state is in ``until``; returns its summary."""
        from worker.pipeline import submission_progress

        deadline = time.monotonic() + timeout
        summary: dict = {}
        while time.monotonic() < deadline:
            summary = submission_progress(submission_id)
            if seen is not None and (not seen or seen[-1] != summary["state"]):
                seen.append(summary["state"])
            if summary["state"] in until:
                return summary
            time.sleep(0.2)
        raise AssertionError(f"submission {submission_id} still {summary} after {timeout} s\n{self.logs()}")


def _configure(env: dict[str, str]) -> dict[str, str | None]:
    """Point this process (the 'API' side) at the stack; returns what to restore."""
    from services import queue
    from services.config import get_settings
    from services.db.session import dispose_engines

    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    get_settings.cache_clear()
    queue.reset_client()
    dispose_engines()
    return old


def _restore(old: dict[str, str | None]) -> None:
    from services import queue
    from services.config import get_settings
    from services.db.session import dispose_engines

    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()
    queue.reset_client()
    dispose_engines()


def make_stack(tmp: Path, database_url: str, broker_url: str) -> Iterator[Stack]:
    from services.db import migrate

    data_dir = tmp / "data"
    data_dir.mkdir()
    env = {
        "TOUCHSTONE_DATA_DIR": str(data_dir),
        "TOUCHSTONE_DATABASE_URL": database_url,
        "TOUCHSTONE_BROKER_URL": broker_url,
        **TEST_WORKER_ENV,
    }
    old = _configure(env)
    migrate.upgrade("head", database_url)
    stack = Stack(data_dir=data_dir, database_url=database_url, broker_url=broker_url, env=env)
    try:
        yield stack
    finally:
        stack.kill(list(stack.workers))
        _restore(old)


def containers_of(docker_client, submission_id: int) -> list:
    """Every container (running or not) of a submission, found by its label."""
    return docker_client.containers.list(all=True, filters={"label": f"touchstone.submission={submission_id}"})


@pytest.fixture
def redis_stack(tmp_path, pg_database, redis_url, example_images) -> Iterator[Stack]:
    """PostgreSQL + the shared Redis (a database index of our own, flushed) + the worker env."""
    import redis

    broker = redis_url.rsplit("/", 1)[0] + "/11" if redis_url.count("/") > 2 else redis_url.rstrip("/") + "/11"
    redis.Redis.from_url(broker).flushdb()
    yield from make_stack(tmp_path, pg_database, broker)
    redis.Redis.from_url(broker).flushdb()


@pytest.fixture
def recovery_stack(tmp_path, pg_database, own_redis, example_images) -> Iterator[Stack]:
    """PostgreSQL + a Redis server of the test's own (it may restart it)."""
    for stack in make_stack(tmp_path, pg_database, own_redis.url):
        stack.redis = own_redis  # type: ignore[attr-defined]
        yield stack


@pytest.fixture
def embedded_stack(tmp_path, example_images) -> Iterator[Stack]:
    """The embedded default: SQLite file database and the filesystem:// broker under data_dir."""
    yield from make_stack(tmp_path, f"sqlite:///{tmp_path / 'data' / 'touchstone.db'}", "filesystem://")
