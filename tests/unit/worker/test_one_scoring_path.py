"""One scoring path: a prediction folder scored by the service (validate_run on the public case,
infer_shard + score on the hidden ones, real SQLite database, a fake container runtime that writes
the folder) and by ``touchstone evaluate`` gives identical rows -- with a bad organ file (only that
organ worst), a missing organ (an empty mask, ``ok``) and a geometry mismatch (the case worst).
Paths in the details are the container's ``/output`` in the service and the given folder in the
CLI; nothing else may differ."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import typer
from typer.testing import CliRunner

from evaluation import io
from evaluation.cli import register
from evaluation.phantoms import generate_cases, write_case
from evaluation.protocols import load_protocol
from services.db.enums import FailureCode, Role
from services.db.enums import SubmissionState as S
from services.db.models import Algorithm, Case, Score, Submission, Team, TestSet, User
from tests.unit.worker.conftest import DIGEST, FakeRuntime, run_messages, run_result

PROTOCOL = "touchstone"


def write_prediction(case, case_dir: Path, kind: str) -> None:
    """The predictions both paths score."""
    if kind == "missing_organ":  # perfect, but no spleen file
        io.write_masks(case_dir, case.labels, case.affine)
        (case_dir / "segmentations" / "spleen.nii.gz").unlink()
    elif kind == "bad_organ_and_missing_organ":  # liver: not a gzip/NIfTI file; gallbladder: no file
        io.write_masks(case_dir, case.labels, case.affine)
        (case_dir / "segmentations" / "liver.nii.gz").write_bytes(os.urandom(4096))
        (case_dir / "segmentations" / "gall_bladder.nii.gz").unlink(missing_ok=True)
    elif kind == "geometry_mismatch":  # one slice short
        io.write_combined_labels(case_dir, case.labels[:, :, :-1], case.affine)
    elif kind == "bad_labels_one_organ":  # kidney_left mask holds 2s
        io.write_masks(case_dir, case.labels, case.affine)
        io.write_nifti(case_dir / "segmentations" / "kidney_left.nii.gz", (case.labels > 0).astype(np.uint8) * 2,
                       case.affine)
    else:
        assert kind == "perfect"
        io.write_combined_labels(case_dir, case.labels, case.affine)


class WritingRuntime(FakeRuntime):
    """Knows one image; ``run`` writes the prediction of each case of the run into /output."""

    def __init__(self, cases: dict, kinds: dict[str, str]):
        super().__init__(local=(DIGEST,), on_run=self._write)
        self.cases, self.kinds = cases, kinds

    def _write(self, spec):
        for case_id in spec.case_ids:
            write_prediction(self.cases[case_id], Path(spec.output_dir) / case_id, self.kinds[case_id])
        return run_result(spec)


@pytest.fixture
def env(tasks_env):
    """tests/unit/worker/conftest.py::tasks_env."""
    return tasks_env


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    cases = {c.case_id: c for c in generate_cases(4, size="tiny", seed=11)}
    for case in cases.values():
        write_case(case, root)
    return root, cases


def _world(gt_root: Path, cases: dict, public: str) -> int:
    from services.db.session import session_scope

    with session_scope() as session:
        team = Team(name="A")
        session.add(team)
        session.flush()
        algo = Algorithm(team_id=team.id, name="algo")
        testset = TestSet(name="ts", protocol_name=PROTOCOL, protocol_version="1", protocol_key=f"{PROTOCOL}@1",
                          protocol_json={}, manifest_sha256="0" * 64, root_path=str(gt_root), time_per_case_s=10,
                          memory_bytes=1 << 30, gpus=0, shm_bytes=1 << 26, pids_limit=64, shard_size=2,
                          quota_submissions=9, quota_period_days=7)
        session.add_all([User(name="u", role=Role.inventor, team_id=team.id), algo, testset])
        session.flush()
        for case_id in cases:
            session.add(Case(testset_id=testset.id, case_id=case_id, image_path=str(gt_root / case_id / "ct.nii.gz"),
                             labels_path=str(gt_root / case_id), public_sample=case_id == public))
        sub = Submission(algorithm_id=algo.id, testset_id=testset.id, team_id=team.id, state=S.validating,
                         image_path="uploads/x.tar", image_sha256="1" * 64, image_digest=DIGEST)
        session.add(sub)
        session.flush()
        return sub.id


def _run_service(sent: list, submission_id: int) -> str:
    """validate_run, then every infer_shard, score and finalize message it leads to, in this process."""
    from worker import validation

    outcome = validation.validate_run(submission_id)
    run_messages(sent)
    return outcome


def _service_rows(submission_id: int) -> dict[tuple[str, str], dict]:
    from services.db.session import session_scope

    with session_scope() as session:
        found = session.execute(
            sa.select(Case.case_id, Score.organ, Score.dsc, Score.nsd, Score.hd95, Score.assd, Score.status, Score.detail)
            .join(Case, Case.id == Score.case_id).where(Score.submission_id == submission_id)).all()
    return {(r.case_id, r.organ): {"dsc": r.dsc, "nsd": r.nsd, "hd95": r.hd95, "assd": r.assd, "status": r.status,
                                   "detail": r.detail or ""} for r in found}


def _cli_rows(gt_root: Path, pred_root: Path, out: Path) -> dict[tuple[str, str], dict]:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["evaluate", "--gt", str(gt_root), "--pred", str(pred_root), "--protocol", PROTOCOL,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {}
    with open(out, newline="") as fh:
        for r in csv.DictReader(fh):
            values = {m: (float(r[m]) if r.get(m) not in (None, "") else None) for m in ("dsc", "nsd", "hd95", "assd")}
            values = {m: (None if v is not None and math.isnan(v) else v) for m, v in values.items()}  # the DB keeps no NaN
            rows[(r["case_id"], r["organ"])] = {**values, "status": r["status"],
                                                "detail": r["detail"].replace(str(pred_root), "/output")}
    return rows


def test_service_and_cli_give_one_folder_identical_rows(env, phantoms, tmp_path):
    gt_root, cases = phantoms
    ids = sorted(cases)
    kinds = {ids[0]: "missing_organ", ids[1]: "bad_organ_and_missing_organ", ids[2]: "geometry_mismatch",
             ids[3]: "bad_labels_one_organ"}
    env["use_runtime"](WritingRuntime(cases, kinds))
    submission_id = _world(gt_root, cases, public=ids[0])
    assert _run_service(env["sent"], submission_id) == "queued 2 shard(s)"
    service = _service_rows(submission_id)

    pred_root = tmp_path / "pred"
    for case_id, kind in kinds.items():
        write_prediction(cases[case_id], pred_root / case_id, kind)
    cli = _cli_rows(gt_root, pred_root, tmp_path / "rows.csv")

    assert set(service) == set(cli) and len(cli) == 4 * len(load_protocol(PROTOCOL).organs)
    for key in sorted(cli):
        assert service[key] == cli[key], key
    status = {key: row["status"] for key, row in cli.items()}
    # the prediction folder exercised what it should: only the bad organ, the whole mis-shaped case
    assert status[(ids[1], "liver")] == "unreadable" and status[(ids[1], "gall_bladder")] == "ok"
    assert {s for (c, o), s in status.items() if c == ids[1] and o != "liver"} == {"ok"}
    assert {s for (c, _), s in status.items() if c == ids[2]} == {"geometry_mismatch"}
    assert status[(ids[3], "kidney_left")] == "invalid_labels"
    assert "no mask file for spleen" in cli[(ids[0], "spleen")]["detail"] and status[(ids[0], "spleen")] == "ok"
    assert "/output/" in cli[(ids[1], "liver")]["detail"] and str(tmp_path) not in service[(ids[1], "liver")]["detail"]
    from services.db.session import session_scope

    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        assert sub.state is S.scored and sub.failure_code is None


def test_a_public_case_the_scorer_refuses_fails_the_validation_with_its_code(env, phantoms):
    from services.db.session import session_scope

    gt_root, cases = phantoms
    ids = sorted(cases)
    kinds = dict.fromkeys(ids, "perfect") | {ids[0]: "bad_organ_and_missing_organ"}
    env["use_runtime"](WritingRuntime(cases, kinds))
    submission_id = _world(gt_root, cases, public=ids[0])
    assert _run_service(env["sent"], submission_id) == "failed: invalid_output"
    with session_scope() as session:
        sub = session.get(Submission, submission_id)
        assert sub.state is S.failed and sub.failure_code == FailureCode.INVALID_OUTPUT.value
        reason, log = sub.failure_reason, sub.validation_log
        assert session.scalar(sa.select(sa.func.count(Score.id)).where(Score.submission_id == submission_id)) == 0
    assert "unreadable or mis-shaped files" in reason and f"case {ids[0]} (liver): unreadable" in reason
    assert f"/output/{ids[0]}/segmentations/liver.nii.gz" in reason and "<storage>" not in reason
    assert f"case {ids[0]}, liver: unreadable" in log
