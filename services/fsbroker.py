"""Atomic message files for kombu's ``filesystem://`` transport (the embedded broker).

kombu's ``Channel._put`` creates ``<ms>_<uuid>.<queue>.msg`` *in the watched folder* and only then
writes the message into it, while ``Channel._get`` of another process moves and reads any file with
that name it sees. A consumer polling at the wrong moment takes an empty file, fails with
``JSONDecodeError`` and the worker's consumer dies (the message is lost). Seen in practice when the
API enqueues while a worker polls every 0.1 s.

:func:`install` replaces ``_put`` with a write to a hidden ``.<name>.partial`` file in the same
folder followed by ``os.rename`` to the final name: a rename within one filesystem is atomic, so a
consumer sees either no message or the whole message. ``_get``, ``_size`` and ``_purge`` ignore
the partial file (its name does not end in ``.<queue>.msg`` after the first dot).

The fanout exchange tables (``control/<exchange>.exchange``, used by Celery's remote control) have
the same race: ``_queue_bind`` of one worker creates the file and only then locks and writes it,
while a second worker starting at the same moment sees the file, locks it first and reads it
empty -> ``JSONDecodeError`` -> "Unrecoverable error" at start-up. :func:`install` makes both
``_queue_bind`` and ``get_table`` open the file without truncating it, take the lock, and read an
empty file as an empty table.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

_INSTALLED = False


def install() -> None:
    """Patch kombu's filesystem transport (idempotent; both producers and consumers call it)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from kombu.exceptions import ChannelError
    from kombu.transport import filesystem
    from kombu.utils.encoding import bytes_to_str, str_to_bytes
    from kombu.utils.json import dumps, loads

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb", buffering=0) as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.rename(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    _put.__doc__ = "Put `message` onto `queue` (written aside, then renamed into place: atomic)."

    def _read_table(handle) -> list:
        data = bytes_to_str(handle.read())
        return [filesystem.exchange_queue_t(*q) for q in loads(data)] if data.strip() else []

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)  # never truncates another's table
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        with os.fdopen(fd, "rb+", buffering=0) as handle:
            filesystem.lock(handle, filesystem.LOCK_EX)
            try:
                queues = _read_table(handle)
                if entry not in queues:
                    queues.insert(0, entry)
                    handle.seek(0)
                    handle.truncate()
                    handle.write(str_to_bytes(dumps(queues)))
            finally:
                filesystem.unlock(handle)

    def get_table(self, exchange):
        file = self._exchange_file(exchange)
        try:
            with file.open("rb") as handle:
                filesystem.lock(handle, filesystem.LOCK_SH)
                try:
                    return _read_table(handle)
                finally:
                    filesystem.unlock(handle)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc

    filesystem.Channel._put = _put
    filesystem.Channel._queue_bind = _queue_bind
    filesystem.Channel.get_table = get_table
    _INSTALLED = True
