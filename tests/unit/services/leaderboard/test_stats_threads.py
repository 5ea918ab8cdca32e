"""The statistics' thread pool holds BLAS to one thread while any run is inside it and restores
the process's setting when the last one leaves, also when runs overlap; the case-column lookup."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from services.leaderboard import compute


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_overlapping_runs_restore_blas_threads():
    before = _blas_threads()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with compute._stats_threads():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with compute._stats_threads():
            second_in.set()
            first_out.wait(10)
            seen["while the second still runs"] = _blas_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(n == 1 for n in seen["while the second still runs"])
    assert _blas_threads() == before


@pytest.mark.parametrize("pks", [np.array([3, 1, 2]), np.array([5, 2**40, 7])])
def test_case_columns_dense_and_sparse(pks):
    scored = np.array([pks[2], pks[0], 999_999, pks[1]])
    assert compute._case_columns(pks, scored).tolist() == [2, 0, -1, 1]


def test_case_columns_refuse_duplicate_pks():
    with pytest.raises(ValueError, match="not unique"):
        compute._case_columns(np.array([1, 1]), np.array([1]))
