"""`touchstone evaluate` on a tumour set: lesion metric columns and the per-lesion CSV."""

from __future__ import annotations

import csv

import typer
from typer.testing import CliRunner

from evaluation.cli import LESION_CSV_COLUMNS, register
from evaluation.labels import LESION_LABEL_IDS
from evaluation.metric_registry import LESION_METRICS
from evaluation.phantoms import write_phantom_set, write_predictions

app = typer.Typer()
register(app)
runner = CliRunner()


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_lesion_columns_and_one_row_per_lesion(tmp_path):
    write_phantom_set(tmp_path / "gt", 4, size="small", seed=11, lesions=True)
    write_predictions(tmp_path / "gt", tmp_path / "pred", "miss_small_lesions", lesions=True, min_lesion_voxels=60)
    res = runner.invoke(app, ["evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"),
                              "--protocol", "touchstone-lesions", "--out", str(tmp_path / "r.csv"),
                              "--lesions-out", str(tmp_path / "l.csv")])
    assert res.exit_code == 0, res.output
    rows = _read(tmp_path / "r.csv")
    assert list(rows[0]) == ["case_id", "organ", "dsc", "nsd", *LESION_METRICS, "status", "detail"]
    lesion_rows = [r for r in rows if r["organ"] in LESION_LABEL_IDS]
    assert len(lesion_rows) == 4 * len(LESION_LABEL_IDS)
    assert all(r["lesion_f1"] == "" for r in rows if r["organ"] not in LESION_LABEL_IDS)
    lesions = _read(tmp_path / "l.csv")
    assert lesions and tuple(lesions[0]) == LESION_CSV_COLUMNS
    for r in lesion_rows:  # the per-lesion rows add up to the per-case counts
        mine = [x for x in lesions if x["case_id"] == r["case_id"] and x["lesion_class"] == r["organ"]]
        truth = [x for x in mine if x["side"] == "truth"]
        assert len(truth) == float(r["lesion_tp"]) + float(r["lesion_fn"])
        assert sum(x["matched"] == "true" for x in truth) == float(r["lesion_tp"])
        assert all((float(x["dsc"]) > 0) == (x["matched"] == "true") for x in mine)
    # the detector misses the small lesions: some truth rows are unmatched, and they are the small ones
    missed = [int(x["voxels"]) for x in lesions if x["side"] == "truth" and x["matched"] == "false"]
    found = [int(x["voxels"]) for x in lesions if x["side"] == "truth" and x["matched"] == "true"]
    assert missed and found and max(missed) < 60 <= min(found)


def test_lesions_out_needs_a_lesion_protocol(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    res = runner.invoke(app, ["evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"),
                              "--protocol", "touchstone", "--lesions-out", str(tmp_path / "l.csv")])
    assert res.exit_code == 2 and "kind: lesion" in res.output
