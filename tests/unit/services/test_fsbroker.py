"""The embedded broker's message files appear whole or not at all (services/fsbroker.py)."""

from __future__ import annotations

import json
import os

from kombu import Connection


def test_message_files_are_renamed_into_place_complete(tmp_path, monkeypatch):
    import services.fsbroker as fsbroker
    from services.config import Settings

    options = Settings(data_dir=tmp_path).broker_transport_options()  # installs the atomic _put
    renames = []
    real_rename = os.rename

    def spy(src, dst):
        if os.path.dirname(dst) == options["data_folder_in"]:  # into the polled folder (not _get's move out)
            with open(src, "rb") as handle:
                content = handle.read()
            renames.append((os.path.basename(src), os.path.basename(dst), content, os.path.exists(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(fsbroker.os, "rename", spy)
    payload = {"blob": "x" * 100_000}
    with Connection("filesystem://", transport_options=options) as conn:
        queue = conn.SimpleQueue("gpu")
        for _ in range(3):
            queue.put(payload)
        received = [queue.get(timeout=5) for _ in range(3)]
        for message in received:
            message.ack()
        queue.close()
    assert [m.payload for m in received] == [payload] * 3
    assert len(renames) == 3
    for src, dst, content, existed in renames:
        # written under a name no consumer takes, complete before it gets the name consumers poll for
        assert src.startswith(".") and src.endswith(".partial") and src[1:-len(".partial")] == dst
        assert dst.endswith(".gpu.msg") and not existed
        assert json.loads(content)["body"]
    assert not [n for n in os.listdir(options["data_folder_in"]) if n.endswith(".partial")]


def test_an_exchange_table_created_empty_by_another_worker_is_read_as_empty(tmp_path):
    """Two workers starting together: one has created ``<exchange>.exchange`` but not written it yet
    when the other binds -- that must not be an "Unrecoverable error"."""
    from services.config import Settings

    options = Settings(data_dir=tmp_path).broker_transport_options()
    control = tmp_path / "control"
    options = {**options, "control_folder": str(control)}
    control.mkdir()
    (control / "celery.pidbox.exchange").write_bytes(b"")  # created, not yet written
    with Connection("filesystem://", transport_options=options) as conn:
        channel = conn.default_channel
        channel._queue_bind("celery.pidbox", "", "", "worker-b.celery.pidbox")
        assert [q.queue for q in channel.get_table("celery.pidbox")] == ["worker-b.celery.pidbox"]
        channel._queue_bind("celery.pidbox", "", "", "worker-a.celery.pidbox")
        channel._queue_bind("celery.pidbox", "", "", "worker-b.celery.pidbox")  # already there
        assert [q.queue for q in channel.get_table("celery.pidbox")] == ["worker-a.celery.pidbox",
                                                                          "worker-b.celery.pidbox"]
        (control / "empty.exchange").write_bytes(b"")
        assert channel.get_table("empty") == []
