"""Staging a shard's inputs: hard links, bind-mount fallback, cases.json, never a label."""

from __future__ import annotations

import errno
import json
import os

import pytest

from worker.staging import StagingError, stage_shard


def _stored_cts(tmp_path, n=2, mode=0o600):
    storage = tmp_path / "storage"
    paths = []
    for i in range(n):
        case = storage / f"case_{i}"
        case.mkdir(parents=True)
        (case / "ct.nii.gz").write_bytes(b"ct" * (i + 1))
        (case / "combined_labels.nii.gz").write_bytes(b"label")  # must never be staged
        os.chmod(case / "ct.nii.gz", mode)
        paths.append((f"case_{i}", case / "ct.nii.gz"))
    return paths


def test_hard_links_share_the_inode_and_nothing_else_is_staged(tmp_path):
    cases = _stored_cts(tmp_path)
    staged = stage_shard(cases, tmp_path / "stage")
    assert staged.linked == 2 and staged.mounts == () and staged.case_ids == ("case_0", "case_1")
    for case_id, ct in cases:
        assert os.path.samefile(tmp_path / "stage" / case_id / "ct.nii.gz", ct)
        assert ct.stat().st_mode & 0o004, "the sandbox uid must be able to read the CT"
    files = sorted(str(p.relative_to(tmp_path / "stage")) for p in (tmp_path / "stage").rglob("*") if p.is_file())
    assert files == ["case_0/ct.nii.gz", "case_1/ct.nii.gz", "cases.json"]
    assert json.loads((tmp_path / "stage" / "cases.json").read_text()) == {
        "version": 1,
        "cases": [
            {"case_id": "case_0", "ct": "/input/case_0/ct.nii.gz"},
            {"case_id": "case_1", "ct": "/input/case_1/ct.nii.gz"},
        ],
    }


def test_bind_mode_writes_placeholders_and_read_only_mounts(tmp_path):
    cases = _stored_cts(tmp_path)
    staged = stage_shard(cases, tmp_path / "stage", mode="bind")
    assert staged.linked == 0
    assert [(m.host_path, m.container_path) for m in staged.mounts] == [
        (cases[0][1].resolve(), "/input/case_0/ct.nii.gz"),
        (cases[1][1].resolve(), "/input/case_1/ct.nii.gz"),
    ]
    placeholder = tmp_path / "stage" / "case_0" / "ct.nii.gz"
    assert placeholder.stat().st_size == 0 and not os.path.samefile(placeholder, cases[0][1])


def test_auto_falls_back_to_bind_mounts_across_filesystems(tmp_path, monkeypatch):
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    staged = stage_shard(_stored_cts(tmp_path, n=1), tmp_path / "stage")
    assert staged.linked == 0 and len(staged.mounts) == 1
    with pytest.raises(StagingError, match="could not hard-link"):
        stage_shard(_stored_cts(tmp_path / "again", n=1), tmp_path / "stage2", mode="link")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200, "a b"])
def test_case_ids_must_be_folder_names(tmp_path, bad):
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x")
    with pytest.raises(StagingError, match="cannot be a folder name"):
        stage_shard([(bad, ct)], tmp_path / "stage")


def test_refuses_duplicates_missing_cts_and_reused_folders(tmp_path):
    cases = _stored_cts(tmp_path, n=1)
    with pytest.raises(StagingError, match="twice"):
        stage_shard(cases + cases, tmp_path / "s1")
    with pytest.raises(StagingError, match="missing"):
        stage_shard([("case_9", tmp_path / "nope.nii.gz")], tmp_path / "s2")
    stage_shard(cases, tmp_path / "s3")
    with pytest.raises(StagingError, match="not empty"):
        stage_shard(cases, tmp_path / "s3")
    with pytest.raises(StagingError, match="at least one"):
        stage_shard([], tmp_path / "s4")
