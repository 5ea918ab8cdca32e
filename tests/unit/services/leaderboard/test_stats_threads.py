"""The statistics' thread pool holds BLAS to one thread while a run is inside it and restores the
process's setting afterwards, also when runs overlap (they take turns); the case-column lookup."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from services.leaderboard import compute


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_overlapping_runs_take_turns_and_restore_blas_threads():
    before = _blas_threads()
    inside: list[tuple[str, str, list[int]]] = []

    def run(name: str) -> None:
        with compute._stats_threads():
            inside.append((name, "in", _blas_threads()))
            time.sleep(0.2)
            inside.append((name, "out", _blas_threads()))

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [(n, step) for n, step, _ in inside] in (
        [("a", "in"), ("a", "out"), ("b", "in"), ("b", "out")],
        [("b", "in"), ("b", "out"), ("a", "in"), ("a", "out")],
    )  # one run at a time
    assert all(n == 1 for _, _, seen in inside for n in seen)
    assert _blas_threads() == before


@pytest.mark.parametrize("pks", [np.array([3, 1, 2]), np.array([5, 2**40, 7])])
def test_case_columns_dense_and_sparse(pks):
    scored = np.array([pks[2], pks[0], 999_999, pks[1]])
    assert compute._case_columns(pks, scored).tolist() == [2, 0, -1, 1]


def test_case_columns_refuse_duplicate_pks():
    with pytest.raises(ValueError, match="not unique"):
        compute._case_columns(np.array([1, 1]), np.array([1]))
