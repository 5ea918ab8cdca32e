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
    from kombu.utils.encoding import str_to_bytes
    from kombu.utils.json import dumps

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
    filesystem.Channel._put = _put
    _INSTALLED = True
