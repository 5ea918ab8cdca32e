"""Loading `docker save` tarballs into the real engine; inspection; the static image checks."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile

import docker.errors
import pytest

from worker.runtime.base import FailureCode, ImageRejected, check_image

pytestmark = pytest.mark.docker


@pytest.fixture
def tiny_image(docker_client, tmp_path):
    """A tiny one-layer image (docker import of one file), saved to a tarball; removed afterwards."""
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs" / "hello.txt").write_text("hello")
    layer = tmp_path / "rootfs.tar"
    with tarfile.open(layer, "w") as archive:
        archive.add(tmp_path / "rootfs" / "hello.txt", arcname="hello.txt")
    tag = "touchstone/test-tiny:loadtest"
    subprocess.run(["docker", "import", "--change", "USER 1000", str(layer), tag], check=True, capture_output=True)
    saved = tmp_path / "tiny.tar"
    subprocess.run(["docker", "save", "-o", str(saved), tag], check=True, capture_output=True)
    image_id = docker_client.images.get(tag).id
    docker_client.images.remove(tag, force=True)
    yield saved, image_id, tag
    for ref in (tag, image_id):
        try:
            docker_client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass


def _with_architecture(src, dst, architecture):
    """Rewrite a saved image's config to another architecture (and its file name to its new digest)."""
    with tarfile.open(src) as archive:
        members = [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive.getmembers()]
    manifest = json.loads(next(d for m, d in members if m.name == "manifest.json"))
    config_name = manifest[0]["Config"]
    config = json.loads(next(d for m, d in members if m.name == config_name))
    config["architecture"] = architecture
    raw = json.dumps(config).encode()
    manifest[0]["Config"] = hashlib.sha256(raw).hexdigest() + ".json"
    with tarfile.open(dst, "w") as out:
        for member, data in members:
            if member.name == config_name:
                member.name, data = manifest[0]["Config"], raw
            elif member.name == "manifest.json":
                data = json.dumps(manifest).encode()
            if data is not None:
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
            else:
                out.addfile(member)
    return dst


def test_load_streams_inspects_and_drops_new_tags(runtime, tiny_image, docker_client):
    saved, image_id, tag = tiny_image
    info = runtime.load_image(saved)
    assert info.image_id == image_id  # the digest of the config: the content address
    assert (info.architecture, info.os) == ("amd64", "linux")
    assert info.user == "1000" and 0 < info.size_bytes < 1000
    # the archive's tag was not left on the engine; the image is known by its digest
    assert info.tags == (f"touchstone-loaded/image:{image_id.split(':')[1]}",)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(tag)
    assert check_image(info, max_size_bytes=10**6) is None
    assert check_image(info, max_size_bytes=1).code is FailureCode.IMAGE_TOO_LARGE
    # loading the same tarball again is fine (a retried validation), and the engine is not asked
    # to read the archive again: it already holds that content address
    calls = []
    real_load = runtime.client.api.load_image
    runtime.client.api.load_image = lambda *a, **k: calls.append(a) or real_load(*a, **k)
    try:
        assert runtime.load_image(saved).image_id == image_id
    finally:
        runtime.client.api.load_image = real_load
    assert calls == []
    runtime.remove_image(image_id)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image_id)
    runtime.remove_image(image_id)  # already gone: no error


def test_arm64_image_is_refused_before_loading(runtime, tiny_image, tmp_path, docker_client):
    saved, image_id, _ = tiny_image
    arm = _with_architecture(saved, tmp_path / "arm.tar", "arm64")
    with pytest.raises(ImageRejected) as caught:
        runtime.load_image(arm)
    assert caught.value.reason.code is FailureCode.WRONG_ARCHITECTURE
    assert "linux/arm64" in caught.value.reason.message
    assert "touchstone/test-tiny:loadtest" not in [t for i in docker_client.images.list() for t in i.tags]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"this is not a tar file at all" * 100, "not a readable tar archive"),
        (None, "no manifest.json"),
    ],
)
def test_unloadable_files_are_explained(runtime, tmp_path, content, expected):
    path = tmp_path / "upload.tar"
    if content is None:
        with tarfile.open(path, "w") as archive:
            data = b"hello"
            member = tarfile.TarInfo("hello.txt")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    else:
        path.write_bytes(content)
    with pytest.raises(ImageRejected) as caught:
        runtime.load_image(path)
    assert caught.value.reason.code is FailureCode.IMAGE_LOAD_FAILED
    assert expected in caught.value.reason.message
    assert "docker save -o algo.tar" in caught.value.reason.message


def test_truncated_tarball_is_refused_by_the_engine(runtime, tiny_image, tmp_path):
    saved, _, _ = tiny_image
    with tarfile.open(saved) as archive:
        members = [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive.getmembers()]
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as out:  # the manifest is there, the layer it names is not
        for member, data in members:
            if member.name.endswith("layer.tar"):
                continue
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ImageRejected) as caught:
        runtime.load_image(broken)
    assert caught.value.reason.code is FailureCode.IMAGE_LOAD_FAILED
    assert "the engine said" in caught.value.reason.message


def test_a_tag_of_another_local_image_is_refused_and_restored(runtime, tiny_image, docker_client, base_image):
    saved, image_id, tag = tiny_image
    base_id = docker_client.images.get(base_image).id
    docker_client.images.get(base_image).tag("touchstone/test-tiny", "loadtest")  # the tag names another image
    try:
        with pytest.raises(ImageRejected) as caught:
            runtime.load_image(saved)
        assert "names another image" in caught.value.reason.message
        assert docker_client.images.get(tag).id == base_id  # the tag was given back
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(image_id)  # and the upload dropped
    finally:
        docker_client.api.remove_image(tag, noprune=True)
    assert docker_client.images.get(base_image).id == base_id


def test_inspect_unknown_image(runtime):
    with pytest.raises(ImageRejected) as caught:
        runtime.inspect_image("sha256:" + "0" * 64)
    assert caught.value.reason.code is FailureCode.IMAGE_LOAD_FAILED
