"""evaluation.manifest: reading, validating (row-numbered errors), checksums, writing."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import io
from evaluation.manifest import ManifestError, ManifestRow, read_manifest, write_manifest

AFF = np.eye(4)
HEADER = "case_id,image,labels,hospital,age,sex,public_sample,site_note\n"


@pytest.fixture
def root(tmp_path):
    for case in ("a", "b"):
        lab = np.zeros((4, 4, 4), np.uint8)
        lab[1:3, 1:3, 1:3] = 5
        io.write_ct(tmp_path / case, lab.astype(np.int16), AFF)
        io.write_masks(tmp_path / case, lab, AFF)
    return tmp_path


def _write(root, body, header=HEADER):
    path = root / "manifest.csv"
    path.write_text(header + body)
    return path


def test_read_valid_manifest_with_extras(root):
    path = _write(root, "a,a/ct.nii.gz,a,H1,61,male,true,left\nb,b/ct.nii.gz,b/segmentations,H2,,F,0,\n")
    m = read_manifest(path)
    assert m.case_ids == ["a", "b"]
    a, b = m.rows
    assert a.sex == "M" and a.age == 61 and a.public_sample is True and a.extras == {"site_note": "left"}
    assert b.age is None and b.public_sample is False and b.race is None
    assert m.image_path(a) == root / "a" / "ct.nii.gz" and m.labels_path(b).name == "segmentations"
    sums = m.checksums()
    assert sums["a"][0] == io.sha256_file(root / "a" / "ct.nii.gz") and len(sums["b"][1]) == 64


def test_all_problems_reported_with_line_numbers(root):
    path = _write(
        root,
        "a,a/ct.nii.gz,a,H1,61,M,true,\n"
        "a,a/ct.nii.gz,a,H1,62,M,true,\n"  # line 3: duplicate
        "c,c/ct.nii.gz,a,H1,40,F,false,\n"  # line 4: missing image
        "d,a/ct.nii.gz,a,H1,sixty,F,false,\n"  # line 5: bad age
        "e,a/ct.nii.gz,a,H1,200,F,maybe,\n"  # line 6: age out of range, bad bool
        "../x,a/ct.nii.gz,a,H1,,F,,\n"  # line 7: unsafe case id
        "f,a/ct.nii.gz,nowhere,,,F,,\n",  # line 8: missing labels, empty hospital
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    text = str(err.value)
    for needle in (
        "line 3, column case_id: duplicate case id 'a' (first on line 2)",
        "line 4, column image: 'c/ct.nii.gz' does not exist",
        "line 5, column age: 'sixty' is not a number of years",
        "line 6, column age",
        "line 6, column public_sample: 'maybe' is not true/false",
        "line 7, column case_id",
        "line 8, column hospital",
    ):
        assert needle in text, (needle, text)
    assert len(err.value.problems) == 7


def test_missing_columns_and_empty_manifest(root):
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['hospital'\]"):
        read_manifest(_write(root, "a,a/ct.nii.gz,a\n", header="case_id,image,labels\n"))
    with pytest.raises(ManifestError, match="no case rows"):
        read_manifest(_write(root, ""))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(root / "nope.csv")
    with pytest.raises(ManifestError, match="holds no labels"):
        (root / "empty").mkdir()
        read_manifest(_write(root, "a,a/ct.nii.gz,empty,H1,,,,\n"))


def test_write_then_read_round_trip_and_checksums(root):
    rows = [
        ManifestRow(case_id="a", image="a/ct.nii.gz", labels="a/segmentations", hospital="H1", age=50, sex="F",
                    race="Asian", public_sample=True, extras={"note": "x"}),
        ManifestRow(case_id="b", image="b/ct.nii.gz", labels="b", hospital="H2"),
    ]
    path = write_manifest(root / "m.csv", rows, checksums=True)
    back = read_manifest(path, verify_checksums=True)
    assert [r.model_dump(exclude={"image_sha256", "labels_sha256"}) for r in back.rows] == [
        r.model_dump(exclude={"image_sha256", "labels_sha256"}) for r in rows
    ]
    assert back.rows[0].image_sha256 == io.sha256_file(root / "a" / "ct.nii.gz")
    io.write_masks(root / "a", np.ones((4, 4, 4), np.uint8) * 5, AFF)  # labels change after the manifest
    with pytest.raises(ManifestError, match="line 2, column labels_sha256: checksum mismatch"):
        read_manifest(path, verify_checksums=True)
    read_manifest(path)  # without verification it still reads
