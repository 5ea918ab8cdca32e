"""A tumour test set through the pipeline: tumour phantoms (lesion classes beside the organs),
the touchstone-lesions protocol, the lesion-detector example in a real container, the real worker,
SQLite + filesystem://. Every case is scored for every class of the protocol's label table (organs,
then lesion classes) under touchstone-lesions@1 through the one scoring path."""

from __future__ import annotations

import os
import subprocess

import pytest
import sqlalchemy as sa

from tests.integration.pipeline.conftest import ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "touchstone/example-lesion-detector:latest"


@pytest.fixture(scope="module")
def lesion_detector_image(base_image) -> str:
    env = {**os.environ, "TOUCHSTONE_BASE_IMAGE": base_image}
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), base_image, "--only", "lesion-detector"],
                   check=True, env=env, capture_output=True, timeout=900)
    return IMAGE


def test_tumour_set_scored_with_lesion_protocol(embedded_stack, lesion_detector_image, tmp_path):
    from evaluation.phantoms import write_phantom_set
    from evaluation.protocols import load_protocol
    from services.config import get_settings
    from services.db.models import Case, Score, Submission
    from services.db.session import session_scope
    from services.db.testsets import import_testset

    stack = embedded_stack
    manifest = write_phantom_set(tmp_path / "tumours", 4, public_sample=1, size="small", seed=2, lesions=True)
    with session_scope() as session:
        testset = import_testset(session, "tumours", manifest, protocol="touchstone-lesions", settings=get_settings())
        for key, value in {"time_per_case_s": 60.0, "memory_bytes": 1 << 30, "gpus": 0, "shm_bytes": 64 << 20,
                           "pids_limit": 128, "shard_size": 3, "quota_submissions": 1000}.items():
            setattr(testset, key, value)
    stack.start_workers()
    submission_id = stack.submit("tumours", image_ref=lesion_detector_image)
    summary = stack.wait(submission_id, timeout=300)
    assert summary["state"] == "scored", (summary, stack.logs())

    proto = load_protocol("touchstone-lesions")
    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        cases = session.scalars(sa.select(Case.id).where(Case.testset_id == sub.testset_id)).all()
        scores = session.scalars(sa.select(Score).where(Score.submission_id == submission_id)).all()
        assert {s.protocol_key for s in scores} == {proto.key}
        assert len(scores) == len(cases) * len(proto.classes)
        by_class = {c: [s for s in scores if s.organ == c] for c in proto.classes}
        assert all(len(rows) == len(cases) for rows in by_class.values())
        assert all(s.status == "ok" for s in scores), [(s.organ, s.status, s.detail) for s in scores if s.status != "ok"]
        # the detector writes the liver (and liver lesions) only: the liver scores, the others are missed
        assert all(s.dsc is not None and s.dsc > 0.5 for s in by_class["liver"])
        assert all(s.dsc == 0.0 for s in by_class["spleen"])
        assert all(s.hd95 is None and s.assd is None for s in scores)
