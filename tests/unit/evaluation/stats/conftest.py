"""Fixtures of the statistics unit tests: small score matrices."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.stats import ScoreMatrix, higher_is_better


def _make_matrix(values, metric: str = "dsc", organ: str = "liver", failed=None) -> ScoreMatrix:
    values = np.asarray(values, dtype=float)
    k, n = values.shape
    return ScoreMatrix(
        organ=organ,
        metric=metric,
        algorithms=tuple(chr(ord("A") + i) for i in range(k)),
        case_ids=tuple(f"c{j}" for j in range(n)),
        values=values,
        failed=failed,
        higher_is_better=higher_is_better(metric),
    )


@pytest.fixture
def make_matrix():
    """Factory: ``make_matrix(values, metric="dsc", organ="liver", failed=None)``; algorithms
    are named A, B, C, ... and cases c0, c1, ...; the direction follows the metric."""
    return _make_matrix


@pytest.fixture
def random_matrix() -> ScoreMatrix:
    """5 algorithms x 60 cases, DSC-like with ties (2 decimals) and a few not-scored cells."""
    rng = np.random.default_rng(42)
    values = np.round(np.clip(rng.normal(0.8, 0.1, (5, 1)) + rng.normal(0, 0.08, (5, 60)), 0, 1), 2)
    values[rng.random(values.shape) < 0.05] = np.nan
    return _make_matrix(values)
