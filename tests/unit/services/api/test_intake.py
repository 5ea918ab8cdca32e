"""The docker-save tarball check of the intake (services/api/intake.py)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from services.api.intake import IMAGE_REF, IntakeError, check_docker_save_tar


def _tar(path, members, manifest=None, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.linkname = link
                archive.addfile(info)
        if manifest is not None:
            raw = json.dumps(manifest).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return path


REG = tarfile.REGTYPE
ONE = [{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]


def test_accepts_a_single_image_with_legacy_layer_symlinks(tmp_path):
    path = _tar(tmp_path / "ok.tar", [("c.json", b"{}", REG, ""), ("l1/layer.tar", b"x" * 700, REG, ""),
                                      ("l2/layer.tar", b"", tarfile.SYMTYPE, "../l1/layer.tar")], ONE)
    info = check_docker_save_tar(path)
    assert info.config == "c.json" and info.layers == ["l1/layer.tar", "l2/layer.tar"] and info.repo_tags == ["a:1"]


@pytest.mark.parametrize(
    "members, manifest, words",
    [
        ([("c.json", b"{}", REG, "")], None, "no manifest.json"),
        ([("c.json", b"{}", REG, ""), ("l1/layer.tar", b"", REG, "")], ONE, "not in the tar"),
        ([("c.json", b"{}", REG, ""), ("l1/layer.tar", b"", REG, ""), ("l2/layer.tar", b"", REG, "")],
         ONE * 2, "2 images"),
        ([("/abs", b"x", REG, "")], ONE, "unsafe member name"),
        ([("a/../../b", b"x", REG, "")], ONE, "unsafe member name"),
        ([("evil", b"", tarfile.SYMTYPE, "/etc/passwd")], ONE, "pointing outside"),
        ([("l/evil", b"", tarfile.SYMTYPE, "../../etc/passwd")], ONE, "pointing outside"),
        ([("evil", b"", tarfile.LNKTYPE, "../x")], ONE, "pointing outside"),
        ([("dev", b"", tarfile.CHRTYPE, "")], ONE, "device"),
        ([("c.json", b"{}", REG, "")], {"not": "a list"}, "not a list"),
        ([("c.json", b"{}", REG, "")], [{"Config": 3}], "lacks Config/Layers"),
        ([("c.json", b"{}", REG, ""), ("l1/layer.tar", b"", REG, ""), ("l2/layer.tar", b"", REG, "")],
         [{**ONE[0], "RepoTags": 7}], "RepoTags"),
    ],
)
def test_refusals_name_the_problem(tmp_path, members, manifest, words):
    path = _tar(tmp_path / "bad.tar", members, manifest)
    with pytest.raises(IntakeError, match=words) as info:
        check_docker_save_tar(path)
    assert info.value.status_code == 422


@pytest.mark.parametrize("cut", [100, 512 + 300, -1024, -10])
def test_truncated_tars_are_refused(tmp_path, cut):
    path = _tar(tmp_path / "full.tar", [("c.json", b"{}", REG, ""), ("l1/layer.tar", b"y" * 3000, REG, ""),
                                        ("l2/layer.tar", b"z" * 3000, REG, "")], ONE, fmt=tarfile.USTAR_FORMAT)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[:cut])
    with pytest.raises(IntakeError, match="truncated|not a readable tar|no manifest|not in the tar"):
        check_docker_save_tar(cut_path)


def test_empty_and_garbage(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(IntakeError, match="empty"):
        check_docker_save_tar(tmp_path / "e")
    (tmp_path / "g").write_bytes(b"\x89PNG" * 500)
    with pytest.raises(IntakeError, match="not a readable tar"):
        check_docker_save_tar(tmp_path / "g")


@pytest.mark.parametrize("ref, ok", [("nginx", True), ("registry:5000/team/seg:1.0", True),
                                     ("ghcr.io/a/b@sha256:" + "a" * 64, True), ("UPPER/x", False),
                                     ("a b", False), ("x:", False)])
def test_image_reference_format(ref, ok):
    assert bool(IMAGE_REF.match(ref)) is ok


def test_a_deeply_nested_manifest_is_refused_not_a_crash(tmp_path):
    """json.loads raises RecursionError (not a JSONDecodeError) on deep nesting: still a 422."""
    raw = b"[" * 200_000
    path = tmp_path / "deep.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
        archive.addfile(info, io.BytesIO(raw))
    with pytest.raises(IntakeError, match="not valid JSON") as caught:
        check_docker_save_tar(path)
    assert caught.value.status_code == 422
