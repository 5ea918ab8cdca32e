"""Failure reasons, image checks and per-case timing (worker/runtime/base.py)."""

from __future__ import annotations

import pytest

from worker.runtime.base import FailureCode, FailureReason, ImageInfo, check_image, per_case_wall_times


def _info(**kw):
    fields = dict(image_id="sha256:1", tags=(), architecture="amd64", os="linux", size_bytes=100, user="")
    fields.update(kw)
    return ImageInfo(**fields)


def test_check_image_accepts_small_amd64():
    assert check_image(_info(), max_size_bytes=100) is None


@pytest.mark.parametrize("arch,os_name", [("arm64", "linux"), ("amd64", "windows")])
def test_check_image_refuses_other_platforms(arch, os_name):
    reason = check_image(_info(architecture=arch, os=os_name), max_size_bytes=1000)
    assert reason.code is FailureCode.WRONG_ARCHITECTURE
    assert f"{os_name}/{arch}" in reason.message and "--platform linux/amd64" in reason.message


def test_check_image_refuses_too_large():
    reason = check_image(_info(size_bytes=3 * 2**30), max_size_bytes=2 * 2**30)
    assert reason.code is FailureCode.IMAGE_TOO_LARGE
    assert "3.00 GiB" in reason.message and "2.00 GiB" in reason.message


def test_reasons_name_the_limit():
    assert "12 s" in FailureReason.time_limit(12).message
    assert "512 MiB" in FailureReason.out_of_memory(512 * 2**20).message
    assert "code 3" in FailureReason.nonzero_exit(3).message
    assert str(FailureReason.no_output()).startswith("The container exited normally but wrote nothing")


def test_per_case_wall_times_are_differences_in_completion_order():
    times = per_case_wall_times({"c": 9.0, "a": 2.5, "b": 4.0})
    assert times == pytest.approx({"a": 2.5, "b": 1.5, "c": 5.0})
    assert per_case_wall_times({}) == {}
