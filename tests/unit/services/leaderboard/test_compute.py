"""Pure parts of the leaderboard: summaries equal evaluation.stats.summarize, failure statuses,
Touchstone CSV parsing errors, SVG plots."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.labels import ORGANS
from evaluation.stats import ScoreMatrix, summarize
from services.importers import TouchstoneFormatError, read_metric_csv
from services.leaderboard.compute import is_failure, summary_row
from services.web import plots


def test_summary_row_equals_summarize():
    rng = np.random.default_rng(3)
    values = rng.uniform(0.5, 1.0, 37)
    values[[4, 9]] = np.nan
    failed = np.zeros(37, dtype=bool)
    failed[2] = True
    matrix = ScoreMatrix("liver", "dsc", ("a",), tuple(map(str, range(37))), values[None, :], failed=failed[None, :])
    expected = summarize(matrix, n_resamples=300, seed=5).iloc[0]
    row = summary_row(values, failed, n_resamples=300, seed=5, confidence=0.95)
    assert row["n"] == expected["n_scored"] == 35 and row["n_missing"] == 2 and row["n_failed"] == 1
    for ours, theirs in (("mean", "mean"), ("median", "median"), ("std", "std"),
                         ("ci_low", "mean_ci_low_percentile"), ("ci_high", "mean_ci_high_percentile"),
                         ("median_ci_low", "median_ci_low_percentile"), ("median_ci_high", "median_ci_high_percentile")):
        assert row[ours] == pytest.approx(expected[theirs], abs=1e-15), ours


def test_summary_row_of_nothing_and_of_one_case():
    empty = summary_row(np.array([np.nan, np.nan]), np.zeros(2, bool), n_resamples=10, seed=0, confidence=0.95)
    assert empty["n"] == 0 and empty["mean"] is None and empty["n_missing"] == 2
    one = summary_row(np.array([0.7]), np.zeros(1, bool), n_resamples=10, seed=0, confidence=0.95)
    assert one["mean"] == one["ci_low"] == one["ci_high"] == 0.7 and one["std"] is None


@pytest.mark.parametrize("status, failed", [
    ("ok", False), ("missing_prediction", True), ("invalid_prediction", True), ("unreadable", True),
    ("too_large", True), ("geometry_mismatch", True), ("invalid_labels", True),
    ("timeout", True), ("empty_reference", True),  # outside the enum (no writer makes them): a failure
    (None, False), ("", False)])
def test_failure_statuses(status, failed):
    assert is_failure(status) is failed


def test_read_metric_csv(tmp_path):
    path = tmp_path / "dsc.csv"
    path.write_text("name," + ",".join(ORGANS) + ",extra\nc1," + ",".join(["0.5"] * 8) + ",,x\n")
    assert read_metric_csv(path) == {"c1": {**{o: 0.5 for o in ORGANS[:8]}, "stomach": None}}
    # a repeated case id (Touchstone's published STU-Net files have some): per organ the first
    # non-empty value, as Touchstone's allign() keeps it (dropna, then drop_duplicates keep first)
    path.write_text("name," + ",".join(ORGANS) + "\nc1,," + ",".join(["0.5"] * 8) + "\nc1," + ",".join(["0.7"] * 9)
                    + "\nc2," + ",".join(["0.1"] * 9) + "\n")
    repeated: list[str] = []
    out = read_metric_csv(path, repeated)
    assert out["c1"] == {ORGANS[0]: 0.7, **{o: 0.5 for o in ORGANS[1:]}} and out["c2"][ORGANS[0]] == 0.1
    assert repeated == ["dsc.csv row 3: case 'c1' repeats row 2 (the first non-empty value per organ is kept)"]
    path.write_text("")
    with pytest.raises(TouchstoneFormatError, match="empty file"):
        read_metric_csv(path)


def test_plots_are_inline_svg_with_unique_ids():
    blob = plots.rank_blob_plot(["a", "b"], [[900, 100], [100, 900]], [1, 2], [1, 1], [2, 2], element_id="x")
    heat = plots.significance_heatmap(["a", "b"], [[None, 0.01], [1.0, None]], [[False, True], [False, False]], 0.05,
                                      element_id="y")
    for svg, prefix in ((blob, "x"), (heat, "y")):
        assert svg.startswith("<svg") and "<?xml" not in svg
        ids = [part.split('"')[0] for part in svg.split(' id="')[1:]]
        assert ids and all(i.startswith(prefix + "-") for i in ids)
    assert "0.010" in heat  # p-values written as text
