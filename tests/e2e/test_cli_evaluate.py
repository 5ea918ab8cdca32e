"""`touchstone evaluate` / `phantoms` / `phantom-predictions` end to end on a tiny phantom set."""

from __future__ import annotations

import csv
import shutil

import pytest
import typer
from typer.testing import CliRunner

from evaluation.cli import register
from evaluation.labels import ORGANS

app = typer.Typer()
register(app)
runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    result = _run("phantoms", "--out", root / "gt", "--cases", "3", "--hospitals", "2", "--seed", "4", "--public-sample", "1")
    assert result.exit_code == 0, result.output
    return root


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("layout", ["masks", "combined"])
def test_perfect_predictions_score_one_and_a_missing_case_scores_worst(test_set, tmp_path, layout):
    gt = test_set / "gt"
    result = _run("phantom-predictions", "--gt", gt, "--out", tmp_path / "pred", "--kind", "perfect", "--layout", layout, "--missing-cases", "1")
    assert result.exit_code == 0, result.output
    missing = [p.name for p in gt.iterdir() if p.is_dir() and not (tmp_path / "pred" / p.name).exists()]
    assert len(missing) == 1
    result = _run("evaluate", "--gt", gt, "--pred", tmp_path / "pred", "--protocol", "nsd-deepmind", "--out", tmp_path / "r.csv", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "mean DSC" in result.output and "missing_prediction 9" in result.output
    rows = _read(tmp_path / "r.csv")
    assert list(rows[0]) == ["case_id", "organ", "dsc", "nsd", "hd95", "assd", "status", "detail"]
    assert len(rows) == 3 * len(ORGANS)
    for r in rows:
        if r["case_id"] in missing:
            assert r["status"] == "missing_prediction" and float(r["dsc"]) == 0.0 and float(r["nsd"]) == 0.0
            assert r["hd95"] == "inf"
        else:
            assert r["status"] == "ok" and float(r["dsc"]) == 1.0 and float(r["nsd"]) == 1.0
            assert float(r["hd95"]) == 0.0 and float(r["assd"]) == 0.0


def test_broken_prediction_files_never_fail_the_run(test_set, tmp_path):
    gt = test_set / "gt"
    pred = tmp_path / "pred"
    assert _run("phantom-predictions", "--gt", gt, "--out", pred, "--kind", "perfect", "--layout", "combined").exit_code == 0
    cases = sorted(p.name for p in pred.iterdir())
    first = pred / cases[0] / "combined_labels.nii.gz"
    first.write_bytes(first.read_bytes()[:50])  # truncated
    shutil.rmtree(pred / cases[1])
    assert _run("phantom-predictions", "--gt", gt, "--out", tmp_path / "moved", "--kind", "wrong_affine", "--layout", "combined").exit_code == 0
    shutil.copy(tmp_path / "moved" / cases[2] / "combined_labels.nii.gz", pred / cases[2] / "combined_labels.nii.gz")
    (pred / "not_a_case").mkdir()
    result = _run("evaluate", "--gt", gt, "--pred", pred, "--out", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "not test cases" in result.output
    status = {r["case_id"]: r["status"] for r in _read(tmp_path / "r.csv")}
    assert status == {cases[0]: "unreadable", cases[1]: "missing_prediction", cases[2]: "geometry_mismatch"}
    header = list(_read(tmp_path / "r.csv")[0])
    assert header == ["case_id", "organ", "dsc", "nsd", "status", "detail"]  # touchstone: no hd95/assd


def test_cases_from_manifest(test_set, tmp_path):
    gt = test_set / "gt"
    assert _run("phantom-predictions", "--gt", gt, "--out", tmp_path / "p", "--kind", "dilate").exit_code == 0
    result = _run("evaluate", "--cases-from", gt / "manifest.csv", "--pred", tmp_path / "p", "--out", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    rows = _read(tmp_path / "r.csv")
    assert {r["status"] for r in rows} == {"ok"} and all(0 < float(r["dsc"]) < 1 for r in rows)
    assert [r["case_id"] for r in rows[:: len(ORGANS)]] == ["phantom_00000", "phantom_00001", "phantom_00002"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gt", "{tmp}/missing", "--pred", "{tmp}"], "ground-truth folder"),
        (["--gt", "{gt}", "--pred", "{tmp}/missing"], "prediction folder"),
        (["--gt", "{gt}", "--pred", "{tmp}", "--protocol", "nonsense"], "unknown protocol 'nonsense'"),
        (["--pred", "{tmp}"], "give the ground truth"),
        (["--cases-from", "{tmp}/nope.csv", "--pred", "{tmp}"], "does not exist"),
        (["--gt", "{tmp}", "--pred", "{tmp}"], "no case folders with labels"),
        (["--gt", "{gt}", "--pred", "{tmp}", "--device", "quantum"], "unknown device 'quantum'"),
    ],
)
def test_bad_usage_exits_2_with_a_message(test_set, tmp_path, args, message):
    filled = [a.format(tmp=tmp_path, gt=test_set / "gt") for a in args]
    result = _run("evaluate", *filled)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_phantoms_command_is_deterministic_and_validates_size(tmp_path):
    for name in ("a", "b"):
        assert _run("phantoms", "--out", tmp_path / name, "--cases", "2", "--seed", "9").exit_code == 0
    for f in ("phantom_00001/ct.nii.gz", "phantom_00001/segmentations/liver.nii.gz", "manifest.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    result = _run("phantoms", "--out", tmp_path / "c", "--cases", "1", "--size", "huge")
    assert result.exit_code == 2 and "unknown --size" in result.output


def test_device_path_gives_the_cpu_values(test_set, tmp_path, monkeypatch):
    """``--device`` routes scoring through :mod:`evaluation.gpu` (torch); on this machine's CPU
    torch the values must be those of the numpy path. The CUDA device itself is swapped for torch's
    CPU device (no GPU here), so what is checked is the routing and the values."""
    import evaluation.gpu as gpu
    from evaluation.scoring import score_case

    gt = test_set / "gt"
    result = _run("phantom-predictions", "--gt", gt, "--out", tmp_path / "pred", "--kind", "realistic")
    assert result.exit_code == 0, result.output
    calls = []
    real = gpu.compute_case_metrics

    def on_torch_cpu(pred, truth, spacing, protocol, device="cuda"):
        calls.append(device)
        return real(pred, truth, spacing, protocol, device="cpu")

    monkeypatch.setattr(gpu, "compute_case_metrics", on_torch_cpu)
    case = sorted(p.name for p in gt.iterdir() if p.is_dir())[0]
    on_cpu = score_case(case, gt / case, tmp_path / "pred" / case, "nsd-deepmind")
    on_device = score_case(case, gt / case, tmp_path / "pred" / case, "nsd-deepmind", device="cuda:0")
    assert calls == ["cuda:0"]
    assert [r.organ for r in on_device] == [r.organ for r in on_cpu]
    for a, b in zip(on_cpu, on_device):
        for metric in ("dsc", "nsd", "hd95", "assd"):
            assert getattr(a, metric) == pytest.approx(getattr(b, metric), abs=1e-9, nan_ok=True)
