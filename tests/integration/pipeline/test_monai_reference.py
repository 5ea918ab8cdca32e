"""The MONAI reference model (examples/algorithms/monai-segresnet) through the whole pipeline, as an
inventor submits it: image built from the local wheelhouse, `docker save` tarball through the API's
intake path, validation on the public sample, sharded inference under the sandbox, scoring.

Its phantoms (seed 7, 3 hospitals) are disjoint from the training phantoms (train.py: seeds 1000+).
Requires `scored` and a mean DSC of at least 0.80 over the hidden cases' organs, and that the shards'
run time and peak memory are recorded (the efficiency figures every submission gets).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TAG = "touchstone/example-monai-segresnet:latest"
MIN_MEAN_DSC = 0.80
SEED, N_CASES, N_HOSPITALS = 7, 6, 3


@pytest.fixture(scope="module")
def monai_tarball(docker_client, base_image, tmp_path_factory) -> Path:
    env = {**os.environ, "TOUCHSTONE_BASE_IMAGE": base_image}
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), base_image, "--only", "monai-segresnet"],
                   check=True, env=env, capture_output=True, timeout=900)
    path = tmp_path_factory.mktemp("monai") / "monai-segresnet.tar"
    subprocess.run(["docker", "save", "-o", str(path), TAG], check=True, timeout=600)
    return path


@pytest.fixture(scope="module")
def monai_phantoms(tmp_path_factory) -> Path:
    from evaluation.phantoms import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("monai-phantoms"), N_CASES, n_hospitals=N_HOSPITALS,
                             size="tiny", seed=SEED, public_sample=1)


def test_monai_segresnet_scored_with_mean_dsc_080(embedded_stack, monai_tarball, monai_phantoms):
    from evaluation.labels import ORGANS
    from services.db.models import Case, CaseRun, Score, Shard, Submission
    from services.db.session import session_scope

    stack = embedded_stack
    stack.add_testset("monai-phantoms", monai_phantoms, shard_size=3, time_per_case_s=60.0,
                      memory_bytes=2 << 30, shm_bytes=256 << 20)
    stack.start_workers()
    submission_id = stack.submit("monai-phantoms", tarball=monai_tarball, algorithm="monai-segresnet")
    summary = stack.wait(submission_id, timeout=600)
    assert summary["state"] == "scored", (summary, stack.logs())

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        assert "device: cpu" in sub.validation_log, sub.validation_log  # predict.py says where it ran
        hidden = session.execute(sa.select(Case.id, Case.hospital).where(
            Case.testset_id == sub.testset_id, Case.public_sample.is_(False))).all()
        assert len({hospital for _, hospital in hidden}) >= 2
        scores = session.scalars(sa.select(Score).where(Score.submission_id == submission_id,
                                                        Score.case_id.in_([pk for pk, _ in hidden]))).all()
        assert len(scores) == len(hidden) * len(ORGANS)
        per_organ = {organ: [s.dsc or 0.0 for s in scores if s.organ == organ] for organ in ORGANS}
        means = {organ: sum(v) / len(v) for organ, v in per_organ.items()}
        mean = sum(s.dsc or 0.0 for s in scores) / len(scores)
        print("DSC " + " ".join(f"{o}={v:.3f}" for o, v in means.items()) + f" mean={mean:.3f}")
        assert mean >= MIN_MEAN_DSC, means
        # efficiency: per shard run time and peak memory, per case wall time
        shards = session.scalars(sa.select(Shard).where(Shard.submission_id == submission_id)).all()
        assert shards and all(s.state.value == "succeeded" for s in shards)
        assert all(s.run_seconds and s.run_seconds > 0 for s in shards)
        assert all(s.peak_memory_bytes and 50 << 20 < s.peak_memory_bytes < 2 << 30 for s in shards), \
            [s.peak_memory_bytes for s in shards]
        runs = session.scalars(sa.select(CaseRun).where(CaseRun.submission_id == submission_id)).all()
        assert len(runs) == len(hidden) and all(r.status == "ok" and r.wall_seconds is not None for r in runs)
        print("shards: " + ", ".join(f"{s.run_seconds:.1f} s / {s.peak_memory_bytes / 2**20:.0f} MiB"
                                     for s in shards))
