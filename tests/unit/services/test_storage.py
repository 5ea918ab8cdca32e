"""Local storage: streamed writes with sha256 and a size limit, atomic rename, safe paths."""

from __future__ import annotations

import hashlib

import pytest

from services.storage import Storage, StorageError, UploadTooLarge


def test_streamed_write_hashes_and_renames(tmp_path):
    storage = Storage(tmp_path)
    chunks = [b"abc", b"", b"def" * 1000]
    size, sha = storage.save_stream(chunks, "uploads/x/a.tar")
    data = b"".join(chunks)
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "uploads/x/a.tar").read_bytes() == data
    assert [p.name for p in (tmp_path / "uploads/x").iterdir()] == ["a.tar"]  # no partial file left


def test_size_limit_removes_the_partial_file(tmp_path):
    storage = Storage(tmp_path)
    with pytest.raises(UploadTooLarge, match="10 bytes"):
        storage.save_stream([b"12345", b"678901"], "u/big.tar", max_bytes=10)
    assert list((tmp_path / "u").iterdir()) == []


def test_error_midway_leaves_nothing(tmp_path):
    storage = Storage(tmp_path)

    def chunks():
        yield b"data"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        storage.save_stream(chunks(), "u/a.tar")
    assert list((tmp_path / "u").iterdir()) == []


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "", "a/\x00"])
def test_unsafe_paths_are_refused(tmp_path, bad):
    with pytest.raises(StorageError):
        Storage(tmp_path).path(bad)


def test_symlink_escape_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(StorageError, match="outside"):
        Storage(root).path("link/secret")
