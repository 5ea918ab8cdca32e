"""Every metric's direction comes from the one registry (evaluation.metric_registry), and the
statistics use it: a lesion count where fewer is better ranks the algorithm with fewer first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation import metric_registry as registry
from evaluation.protocols import Protocol, load_protocol
from evaluation.stats import HIGHER_IS_BETTER, higher_is_better, rank, score_matrices_from_long


def test_statistics_read_the_registry():
    assert HIGHER_IS_BETTER is registry.HIGHER_IS_BETTER
    assert set(registry.METRICS) == set(registry.METRIC_INFO) == set(HIGHER_IS_BETTER)
    for name, info in registry.METRIC_INFO.items():
        assert higher_is_better(name) is info.higher_is_better
        assert info.lower <= info.upper and info.family in ("organ", "lesion")
    assert [m for m in registry.METRICS if not HIGHER_IS_BETTER[m]] == ["hd95", "assd", "lesion_fp", "lesion_fn"]
    with pytest.raises(ValueError, match="unknown metric"):
        registry.metric_info("dice")


def test_protocols_accept_exactly_the_registry_metrics():
    p = load_protocol("touchstone-lesions")
    assert p.metrics == tuple(m for m in registry.METRICS if m in p.metrics)
    assert set(p.lesion_metrics) == set(registry.LESION_METRICS)
    with pytest.raises(Exception, match="unknown metrics"):
        Protocol.model_validate({**p.to_dict(), "metrics": ["dsc", "lesion_recall"]})


@pytest.mark.parametrize("method", ["mean", "median", "rank-mean"])
def test_ranking_uses_the_direction_of_lesion_metrics(method):
    # A: more lesions found but more false positives; B: the reverse
    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(30)]
    rows = []
    for algo, fp, sens in (("A", 3, 0.9), ("B", 1, 0.6)):
        for c in cases:
            rows.append({"algorithm": algo, "case_id": c, "organ": "liver_lesion",
                         "lesion_fp": fp + rng.integers(0, 2), "lesion_sensitivity": sens + rng.normal(0, 0.02)})
    mats = score_matrices_from_long(pd.DataFrame(rows), metrics=["lesion_fp", "lesion_sensitivity"])
    assert mats[("liver_lesion", "lesion_fp")].higher_is_better is False
    by_fp = rank(mats[("liver_lesion", "lesion_fp")], method).set_index("algorithm")["rank"]
    by_sens = rank(mats[("liver_lesion", "lesion_sensitivity")], method).set_index("algorithm")["rank"]
    assert (by_fp["B"], by_fp["A"]) == (1, 2)
    assert (by_sens["A"], by_sens["B"]) == (1, 2)
