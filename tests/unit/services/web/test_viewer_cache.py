"""The case viewer's caches (services/web/viewer.py): a case decoded once for concurrent slice
requests, a case that cannot be shown remembered as such, PNGs bounded by bytes (LRU)."""

from __future__ import annotations

import threading
import time

import pytest

from services.web import viewer


def test_concurrent_requests_for_one_case_decode_it_once():
    caches = viewer._Caches()
    calls = []

    def load():
        calls.append(1)
        time.sleep(0.2)  # long enough for the other threads to arrive while it decodes
        return "decoded"

    results = []
    threads = [threading.Thread(target=lambda: results.append(caches.case(("c", 1), load))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["decoded"] * 3 and len(calls) == 1 and not caches.loading


def test_a_case_that_cannot_be_shown_is_remembered_and_raised_again():
    caches = viewer._Caches()
    calls = []

    def load():
        calls.append(1)
        raise viewer.CaseProblem("the CT cannot be read")

    for _ in range(2):
        with pytest.raises(viewer.CaseProblem, match="CT"):
            caches.case(("bad",), load)
    assert len(calls) == 1


def test_cases_and_pngs_are_bounded(monkeypatch):
    monkeypatch.setattr(viewer, "PNG_CACHE_BYTES", 25)
    caches = viewer._Caches()
    for i in range(viewer.VOLUME_CACHE_ENTRIES + 2):
        caches.case((i,), lambda i=i: f"case {i}")
    assert len(caches.cases) == viewer.VOLUME_CACHE_ENTRIES and (0,) not in caches.cases
    for i in range(3):
        assert caches.png(("p", i), lambda: b"x" * 10) == b"x" * 10
    assert list(caches.pngs) == [("p", 1), ("p", 2)] and caches.png_bytes == 20
    rendered = []
    caches.png(("p", 2), lambda: rendered.append(1) or b"y")
    assert rendered == []  # a hit: not rendered again
