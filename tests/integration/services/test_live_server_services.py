"""Against a real uvicorn process: uploads racing for the last quota slot, the Celery seam reaching the
(filesystem) broker, and flat server memory while a 2 GiB upload streams."""

from __future__ import annotations

import hashlib
import tarfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from services.db.models import Submission, TestSet
from services.db.session import create_db_engine


def _set_quota(settings, n: int) -> None:
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.update(TestSet).values(quota_submissions=n))
    engine.dispose()


def _count_submissions(settings) -> int:
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        n = conn.scalar(sa.select(sa.func.count(Submission.id)))
    engine.dispose()
    return n


def test_uploads_racing_for_the_last_slots(live_server, world, settings, image_tar):
    """6 uploads at once (two inventors of one team) for 2 free slots: exactly 2 accepted, 4 told 429."""
    base, _ = live_server
    _set_quota(settings, 2)
    start = threading.Barrier(6)
    results: list[int] = []
    lock = threading.Lock()

    def upload(i: int) -> None:
        who = "inv_a" if i % 2 else "inv_a2"
        files = {"algorithm": (None, "algo-a"), "testset": (None, "ts1"),
                 "image": ("image.tar", image_tar(tag=f"race{i}", layer_bytes=200_000), "application/x-tar")}
        with httpx.Client(timeout=60) as client:
            request = client.build_request("POST", f"{base}/api/v1/submissions", files=files,
                                           headers=world["headers"][who])
            start.wait()
            response = client.send(request)
        with lock:
            results.append(response.status_code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [202, 202, 429, 429, 429, 429], results
    assert _count_submissions(settings) == 2


def test_validation_task_reaches_the_broker(live_server, world, settings, image_tar):
    """The default broker is Celery's filesystem transport: the task message lands in its folder."""
    base, _ = live_server
    response = httpx.post(f"{base}/api/v1/submissions", headers=world["headers"]["inv_a"], timeout=60,
                          files={"algorithm": (None, "algo-a"), "testset": (None, "ts1"),
                                 "image": ("i.tar", image_tar(tag="broker"), "application/x-tar")})
    assert response.status_code == 202, response.text
    messages = list((Path(settings.data_dir) / "broker" / "messages").glob("*"))
    assert len(messages) == 1
    text = messages[0].read_text()
    assert "touchstone.validate" in text and '"cpu"' in text


GIB = 1024**3


def _lazy_image_body(boundary: str, layer_bytes: int, fields: dict[str, str]):
    """A multipart body whose file part is a valid docker-save tar with a ``layer_bytes`` layer,
    generated chunk by chunk (never materialised); returns (generator, total length, sha256 of the tar)."""
    import io
    import json

    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        return info.tobuf(format=tarfile.USTAR_FORMAT)

    config = json.dumps({"architecture": "amd64"}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["big:1"], "Layers": ["layer/layer.tar"]}]).encode()

    def pad(n: int) -> bytes:
        return b"\0" * ((512 - n % 512) % 512)

    tar_head = header("config.json", len(config)) + config + pad(len(config)) + header("layer/layer.tar", layer_bytes)
    tar_tail = pad(layer_bytes) + header("manifest.json", len(manifest)) + manifest + pad(len(manifest)) + b"\0" * 1024
    form_head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ) + (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.tar"\r\n'
         "Content-Type: application/x-tar\r\n\r\n").encode()
    form_tail = f"\r\n--{boundary}--\r\n".encode()
    block = bytes(range(256)) * 4096  # 1 MiB, not all zeros
    digest = hashlib.sha256(tar_head)
    full, rest = divmod(layer_bytes, len(block))
    _ = io  # keep the import local to this helper
    # sha256 of the tar, computed the same lazy way
    for _i in range(full):
        digest.update(block)
    digest.update(block[:rest])
    digest.update(tar_tail)

    def generate():
        yield form_head + tar_head
        for _i in range(full):
            yield block
        yield block[:rest]
        yield tar_tail + form_tail

    total = len(form_head) + len(tar_head) + layer_bytes + len(tar_tail) + len(form_tail)
    return generate(), total, digest.hexdigest()


@pytest.fixture
def big_upload_settings(settings):
    settings.max_upload_bytes = 3 * GIB
    return settings


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_server_memory_stays_flat_during_a_2gib_upload(big_upload_settings, world, live_server):
    base, process = live_server
    server = psutil.Process(process.pid)
    baseline = server.memory_info().rss
    peak = {"rss": baseline}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], server.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    boundary = "touchstone-memory-test"
    body, total, sha = _lazy_image_body(boundary, 2 * GIB, {"algorithm": "algo-a", "testset": "ts1"})
    try:
        response = httpx.post(
            f"{base}/api/v1/submissions",
            headers={**world["headers"]["inv_a"], "Content-Type": f"multipart/form-data; boundary={boundary}",
                     "Content-Length": str(total)},
            content=body,
            timeout=httpx.Timeout(600),
        )
    finally:
        stop.set()
        sampler.join()
    assert response.status_code == 202, response.text
    assert response.json()["image_sha256"] == sha
    assert response.json()["image_size_bytes"] > 2 * GIB
    growth_mib = (peak["rss"] - baseline) / 2**20
    print(f"server RSS baseline {baseline / 2**20:.0f} MiB, peak {peak['rss'] / 2**20:.0f} MiB, growth {growth_mib:.1f} MiB")
    assert growth_mib < 100, f"server memory grew by {growth_mib:.0f} MiB while streaming 2 GiB"
    stored = list(Path(big_upload_settings.storage_dir).rglob("*.tar"))
    assert len(stored) == 1 and stored[0].stat().st_size == response.json()["image_size_bytes"]
    stored[0].unlink()
