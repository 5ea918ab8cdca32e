"""examples/algorithms/lesion-detector: on tumour phantoms it finds some liver lesions and misses
others, so its lesion detection (sensitivity) and its overlap (DSC) tell different stories.
Runs the example's own segment() on the CT, then scores through evaluation.scoring as the worker does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evaluation import io
from evaluation.phantoms import generate_cases, write_case
from evaluation.protocols import load_protocol
from evaluation.scoring import score_cases, summarize

RUN = Path(__file__).resolve().parents[3] / "examples" / "algorithms" / "lesion-detector" / "run.py"


@pytest.fixture(scope="module")
def detector():
    spec = importlib.util.spec_from_file_location("lesion_detector_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_finds_some_lesions_and_misses_others(detector, tmp_path):
    cases = list(generate_cases(8, size="small", seed=2, lesions=True))[4:]  # 3 cases with liver lesions, 1 without
    todo = []
    for case in cases:
        write_case(case, tmp_path / "gt", combined=True, lesions=True)
        labels = detector.segment(case.ct, case.affine)
        assert set(np.unique(labels)) <= {0, 5, 10}
        io.write_combined_labels(tmp_path / "pred" / case.case_id, labels, case.affine)
        todo.append((case.case_id, tmp_path / "gt" / case.case_id, tmp_path / "pred" / case.case_id))
    proto = load_protocol("touchstone-lesions")
    rows = score_cases(todo, proto)
    liver = [r for r in rows if r.organ == "liver_lesion"]
    tp = sum(r.lesion_metrics["lesion_tp"] for r in liver)
    fn = sum(r.lesion_metrics["lesion_fn"] for r in liver)
    assert tp >= 1 and fn >= 1  # some found, some missed
    found = [rec for r in liver for rec in r.lesions if rec.side == "truth" and rec.matched]
    missed = [rec for r in liver for rec in r.lesions if rec.side == "truth" and not rec.matched]
    assert max(rec.voxels for rec in found) > max(rec.voxels for rec in missed) or min(rec.voxels for rec in missed) < 30
    summary = {e["organ"]: e for e in summarize(rows, proto)}
    assert summary["liver"]["mean_dsc"] > 0.85  # the organ itself is segmented well
    assert summary["kidney_lesion"]["mean_lesion_tp"] == 0  # kidney lesions are never predicted
