"""The production stack of docker-compose.yml, as containers, through one submission.

Images are built here, offline (scripts/build-stack-images.sh): the app image from the local
mmdebstrap base and a host wheelhouse, PostgreSQL and Redis from Debian packages. Then
``docker-compose up`` starts postgres, redis, the one-shot ``migrate`` (``touchstone db upgrade``
from the installed wheel), the api, the cpu worker and the container worker (the host's Docker
socket mounted). An organizer and an inventor are created inside the api container with the CLI;
from the host, through the API, the organizer imports a phantom test set lying in the shared data
folder (mounted at the same path in every container) and the inventor uploads the trivial example's
``docker save`` tarball; the test waits for ``scored`` and checks the scores, the shards (algorithm
containers started by a containerised worker through the socket with host-identical paths) and
``/metrics`` (Redis queue depth, submissions by state). Everything is torn down (``down -v``) even
when the test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "redis", "migrate", "api", "worker-cpu", "worker-containers")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def stack_images(docker_client) -> dict[str, str]:
    """APP_IMAGE, POSTGRES_IMAGE, REDIS_IMAGE built offline by scripts/build-stack-images.sh."""
    if shutil.which("docker-compose") is None:
        from conftest import require  # tests/conftest.py

        require("docker-compose", "the docker-compose command is missing (apt-get install docker-compose)")
    result = subprocess.run(["bash", "scripts/build-stack-images.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, f"building the stack images failed:\n{result.stderr[-5000:]}"
    exports = re.search(r"^export (.+)$", result.stdout, re.M)
    assert exports, result.stdout
    images = dict(pair.split("=", 1) for pair in exports.group(1).split())
    assert set(images) == {"APP_IMAGE", "POSTGRES_IMAGE", "REDIS_IMAGE"}
    return images


@pytest.fixture(scope="module")
def trivial_tarball(docker_client, base_image, tmp_path_factory) -> Path:
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), base_image, "--only", "trivial"],
                   check=True, capture_output=True, timeout=900)
    path = tmp_path_factory.mktemp("upload") / "trivial.tar"
    subprocess.run(["docker", "save", "-o", str(path), "touchstone/example-trivial:latest"], check=True, timeout=600)
    return path


class Compose:
    def __init__(self, project: str, env: dict[str, str]):
        self.project, self.env = project, env

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker-compose", "-p", self.project, "-f", str(ROOT / "docker-compose.yml"), *args],
                                cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{self.logs()}")
        return result

    def logs(self, services: tuple[str, ...] = ("api", "worker-cpu", "worker-containers"), tail: int = 30) -> str:
        parts = []
        for service in services:
            result = subprocess.run(["docker-compose", "-p", self.project, "-f", str(ROOT / "docker-compose.yml"),
                                     "logs", "--no-color", "--tail", str(tail), service], cwd=ROOT, env=self.env,
                                    capture_output=True, text=True, timeout=120)
            parts.append(f"--- {service}\n" + "\n".join(line[:400] for line in result.stdout.splitlines()))
        return "\n".join(parts)


@pytest.fixture
def compose_stack(stack_images, tmp_path):
    """The stack up on a unique project name, data folder and port; ``down -v`` afterwards."""
    data = tmp_path / "shared"
    data.mkdir()
    testsets = tmp_path / "testsets"  # TOUCHSTONE_IMPORT_ROOTS of the stack (never inside the data folder)
    testsets.mkdir()
    port = _free_port()
    project = f"tsci{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **stack_images, "TOUCHSTONE_HOST_DATA": str(data), "TOUCHSTONE_HOST_TESTSETS": str(testsets), "TOUCHSTONE_API_PORT": str(port),
           "TOUCHSTONE_FLOWER_PORT": str(_free_port()), "POSTGRES_PASSWORD": uuid.uuid4().hex}
    compose = Compose(project, env)
    try:
        compose("up", "-d", *SERVICES, timeout=600)
        yield compose, data, f"http://127.0.0.1:{port}"
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(testsets, ignore_errors=True)


# deliberately like the wait in services/cli/demo.py (wait_for_api): the test waits on the compose stack
# itself, reports the compose logs and does not depend on the demo's process supervision.
def _wait_for_api(url: str, compose: Compose, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"the api container did not answer on {url}\n{compose.logs()}")


def _token(compose: Compose, *args: str) -> str:
    out = compose("exec", "-T", "api", "touchstone", "users", "create", *args).stdout
    return out.strip().splitlines()[-1]


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_compose_stack_scores_one_submission(compose_stack, trivial_tarball, docker_client):
    import httpx

    from evaluation.labels import ORGANS
    from evaluation.phantoms import write_phantom_set

    compose, data, api = compose_stack
    # the shared data folder, written on the host, read at the same path inside the containers
    # the import root, mounted at the same path in every container (POST /testsets reads only there)
    manifest = write_phantom_set(data.parent / "testsets" / "phantoms", 5, public_sample=1, size="tiny", seed=11)
    _wait_for_api(api, compose)

    # the one-shot migration ran `touchstone db upgrade` from the installed wheel (alembic files are package data)
    migrate = compose("ps", "-a", "migrate").stdout
    assert "Exit 0" in migrate, migrate
    current = compose("exec", "-T", "api", "touchstone", "db", "current").stdout
    head = re.search(r"head (\S+)", current)
    assert head and f"current {head.group(1)}" in current, current

    organizer = _token(compose, "olga", "--role", "organizer")
    inventor = _token(compose, "ivan", "--role", "inventor", "--team", "ci-team")
    org_h, inv_h = {"Authorization": f"Bearer {organizer}"}, {"Authorization": f"Bearer {inventor}"}

    with httpx.Client(base_url=f"{api}/api/v1", timeout=httpx.Timeout(60, read=600, write=600)) as client:
        r = client.post("/testsets", headers=org_h, json={"name": "ci-phantoms", "manifest_path": str(manifest)})
        assert r.status_code == 201, r.text
        assert r.json()["n_cases"] == 5 and r.json()["n_public_sample"] == 1
        r = client.patch("/testsets/ci-phantoms", headers=org_h, json={
            "gpus": 0, "time_per_case_s": 60, "memory_bytes": 1 << 30, "shm_bytes": 64 << 20, "shard_size": 2})
        assert r.status_code == 200, r.text
        assert client.post("/algorithms", headers=inv_h, json={"name": "threshold"}).status_code == 201
        with open(trivial_tarball, "rb") as handle:
            r = client.post("/submissions", headers=inv_h, data={"algorithm": "threshold", "testset": "ci-phantoms"},
                            files={"image": ("trivial.tar", handle, "application/x-tar")})
        assert r.status_code == 202, r.text
        sid = r.json()["id"]

        seen = []
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            body = client.get(f"/submissions/{sid}", headers=inv_h).json()
            if not seen or seen[-1] != body["state"]:
                seen.append(body["state"])
            if body["state"] in ("scored", "failed", "cancelled"):
                break
            time.sleep(1)
        assert body["state"] == "scored", f"{body}\nstates seen: {seen}\n{compose.logs()}"
        assert body["image_digest"].startswith("sha256:")

        # 4 hidden + 1 public-sample case x 9 organs, every one scored; the trivial threshold finds some liver
        scores = client.get(f"/results/submissions/{sid}/scores", headers=org_h, params={"limit": 1000}).json()
        assert scores["total"] == 5 * len(ORGANS)
        assert {s["status"] for s in scores["items"]} <= {"ok", "empty_reference", "empty_prediction"}
        liver = [s["dsc"] for s in scores["items"] if s["organ"] == "liver"]
        assert len(liver) == 5 and all(0.0 <= d <= 1.0 for d in liver) and max(liver) > 0.0
        # the hidden cases ran in 2 shards, algorithm containers started by the containerised worker
        shards = client.get(f"/submissions/{sid}/shards", headers=org_h).json()
        assert len(shards) == 2 and all(s["state"] == "succeeded" and s["exit_code"] == 0 for s in shards)
        logs = client.get(f"/submissions/{sid}/logs", headers=inv_h).json()
        assert "case " in logs["validation_log"] and ": ok" in logs["validation_log"]

        # /metrics of the api container: the database (PostgreSQL) and the queues (Redis LLEN)
        assert httpx.get(f"{api}/metrics", timeout=30).status_code == 401  # organizers only on the API port
        metrics = httpx.get(f"{api}/metrics", headers=org_h, timeout=30)
        assert metrics.status_code == 200
        assert _metric(metrics.text, "touchstone_submissions", state="scored") == 1
        assert _metric(metrics.text, "touchstone_case_runs_total") == 4
        assert _metric(metrics.text, "touchstone_queue_depth", queue="gpu") == 0
        assert _metric(metrics.text, "touchstone_scrape_errors", part="broker") == 0

    # the worker wrote into the shared folder at the host's path; no algorithm container is left
    assert list((data / "storage").rglob("combined_labels.nii.gz"))
    assert not docker_client.containers.list(all=True, filters={"label": f"touchstone.submission={sid}",
                                                                "status": "running"})
