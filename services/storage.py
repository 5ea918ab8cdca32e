"""Local storage under ``settings.storage_dir`` (a shared folder in production).

Writes are streamed: bytes go to a temporary file in the destination folder while their sha256 and
count are computed, a size limit is enforced as they arrive, and the file appears under its final
name only by an atomic rename once complete. Paths are always relative to the storage root and are
checked so that nothing can escape it (no absolute paths, no ``..``, no symlinks out).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from services.config import Settings, get_settings

CHUNK_BYTES = 1024 * 1024


class StorageError(ValueError):
    """A bad path or a failed write (the message says which)."""


class UploadTooLarge(StorageError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload exceeds the size limit of {limit} bytes")
        self.limit = limit


class Storage:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "Storage":
        settings = settings or get_settings()
        return cls(settings.storage_dir)  # type: ignore[arg-type]

    def path(self, relative: str | PurePosixPath) -> Path:
        """The absolute path of ``relative`` inside the root; refuses anything that would leave it."""
        rel = PurePosixPath(str(relative))
        if rel.is_absolute() or not rel.parts or any(part in ("..", "") for part in rel.parts) or "\x00" in str(rel):
            raise StorageError(f"unsafe storage path {str(relative)!r}: use a relative path without '..'")
        full = (self.root / Path(*rel.parts)).resolve()
        if full != self.root and self.root not in full.parents:
            raise StorageError(f"storage path {str(relative)!r} resolves outside the storage folder")
        return full

    def writer(self, relative: str, max_bytes: int | None = None) -> "StreamingWrite":
        return StreamingWrite(self.path(relative), max_bytes)

    def save_stream(self, chunks: Iterable[bytes], relative: str, max_bytes: int | None = None) -> tuple[int, str]:
        """Write ``chunks`` to ``relative``; returns (size in bytes, sha256 hex)."""
        with self.writer(relative, max_bytes) as write:
            for chunk in chunks:
                write.write(chunk)
            write.commit()
        return write.size, write.sha256

    def delete(self, relative: str) -> None:
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            pass


class StreamingWrite:
    """One streamed write: ``write()`` chunks, then ``commit()``; leaving the ``with`` block without a
    commit (an error, a client that went away) removes the partial file."""

    def __init__(self, destination: Path, max_bytes: int | None) -> None:
        self.destination = destination
        self.max_bytes = max_bytes
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.part")
        self._file = open(self.temporary, "xb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.size = 0
        self.committed = False

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        self._hash.update(chunk)
        self._file.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> Path:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temporary, self.destination)
        self.committed = True
        return self.destination

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            self.temporary.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "StreamingWrite":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()
