"""evaluation.io: both label layouts, CTs, geometry checks and the untrusted-file guards."""

from __future__ import annotations

import gzip
import os
import zlib

import nibabel as nib
import numpy as np
import pytest

from evaluation import io
from evaluation.labels import LABEL_IDS

AFF = np.diag([2.0, 1.5, 3.0, 1.0])
AFF[:3, 3] = (-30.0, -20.0, 10.0)


def _labels(shape=(12, 10, 8)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[1:5, 1:5, 1:4] = LABEL_IDS["liver"]
    lab[6:9, 2:6, 2:6] = LABEL_IDS["spleen"]
    lab[9:11, 7:9, 5:7] = LABEL_IDS["aorta"]
    return lab


def _write_raw_nifti(path, data, affine=AFF, **header):
    img = nib.Nifti1Image(data, affine)
    for k, v in header.items():
        img.header[k] = v
    path.write_bytes(gzip.compress(img.to_bytes()))
    return path


# ---------------------------------------------------------------- layouts


def test_combined_and_masks_layouts_read_back_the_same_labels(tmp_path):
    lab = _labels()
    io.write_combined_labels(tmp_path / "c", lab, AFF)
    io.write_masks(tmp_path / "m", lab, AFF)
    comb = io.read_labels(tmp_path / "c")
    masks = io.read_labels(tmp_path / "m")
    assert comb.layout == "combined" and masks.layout == "masks"
    np.testing.assert_array_equal(comb.label_map, lab)
    np.testing.assert_array_equal(masks.label_map, lab)  # disjoint masks merged into one label map
    assert masks.missing_organs == ()
    assert comb.geometry.shape == lab.shape
    np.testing.assert_allclose(comb.geometry.spacing, (2.0, 1.5, 3.0))
    np.testing.assert_allclose(comb.geometry.origin, (-30.0, -20.0, 10.0))
    assert comb.geometry.orientation == "RAS"


def test_detect_layout_variants_and_preference(tmp_path):
    lab = _labels()
    io.write_masks(tmp_path / "case", lab, AFF)
    assert io.detect_layout(tmp_path / "case") == ("masks", tmp_path / "case" / "segmentations")
    assert io.detect_layout(tmp_path / "case" / "segmentations")[0] == "masks"
    io.write_combined_labels(tmp_path / "case", lab, AFF)
    assert io.detect_layout(tmp_path / "case") == ("combined", tmp_path / "case" / "combined_labels.nii.gz")
    assert io.detect_layout(tmp_path / "case" / "combined_labels.nii.gz")[0] == "combined"
    (tmp_path / "empty").mkdir()
    assert io.detect_layout(tmp_path / "empty") is None
    assert io.detect_layout(tmp_path / "nowhere") is None
    with pytest.raises(io.MissingPrediction) as err:
        io.read_labels(tmp_path / "empty")
    assert err.value.status == "missing_prediction"


def test_overlapping_masks_stay_per_organ_and_missing_organs_are_reported(tmp_path):
    lab = _labels()
    liver = lab == LABEL_IDS["liver"]
    overlap = liver.copy()
    overlap[4:7, 1:5, 1:4] = True  # stomach overlapping the liver
    io.write_masks(tmp_path / "p", {"liver": liver, "stomach": overlap}, AFF)
    got = io.read_labels(tmp_path / "p")
    assert got.label_map is None and set(got.masks) == {"liver", "stomach"}
    np.testing.assert_array_equal(got.masks["stomach"], overlap)
    np.testing.assert_array_equal(got.masks["liver"], liver)
    assert set(got.missing_organs) == set(LABEL_IDS) - {"liver", "stomach"}
    assert got.metrics_input() is got.masks


def test_four_d_with_trailing_one_is_squeezed(tmp_path):
    lab = _labels()
    path = _write_raw_nifti(tmp_path / "x.nii.gz", lab[..., None])
    vol = io.read_nifti(path)
    assert vol.data.shape == lab.shape
    np.testing.assert_array_equal(vol.data, lab)


def test_float_masks_with_integer_values_are_accepted(tmp_path):
    lab = _labels()
    seg = tmp_path / "p" / "segmentations"
    seg.mkdir(parents=True)
    _write_raw_nifti(seg / "liver.nii.gz", (lab == LABEL_IDS["liver"]).astype(np.float32))
    got = io.read_labels(tmp_path / "p")
    np.testing.assert_array_equal(got.label_map == LABEL_IDS["liver"], lab == LABEL_IDS["liver"])


def test_read_ct_applies_scaling_and_keeps_geometry(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    img = nib.Nifti1Image(raw, AFF)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    hu, geom = io.read_ct(tmp_path / "ct.nii.gz")
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, raw * 2.0 - 1024.0)
    assert geom.shape == (5, 4, 3)


def test_big_endian_and_uncompressed_files(tmp_path):
    lab = _labels()
    nib.save(nib.Nifti1Image(lab.astype(">i2"), AFF), tmp_path / "be.nii")
    vol = io.read_nifti(tmp_path / "be.nii")
    assert vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, lab)


def test_ground_truth_ignores_labels_outside_the_protocol(tmp_path):
    lab = _labels()
    lab[0, 0, 0] = 17  # AbdomenAtlas has more classes than the protocol scores
    io.write_combined_labels(tmp_path / "gt", lab, AFF)
    got = io.read_labels(tmp_path / "gt", untrusted=False)
    assert got.label_map[0, 0, 0] == 0
    with pytest.raises(io.InvalidLabels):
        io.read_labels(tmp_path / "gt")  # the same file as a prediction is refused


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        ("truncated", "unreadable", "truncated"),
        ("truncated_data", "unreadable", "truncated"),
        ("truncated_trailer", "unreadable", "truncated"),
        ("not_gzip_not_nifti", "unreadable", "not a NIfTI"),
        ("gzip_not_nifti", "unreadable", "not a NIfTI"),
        ("corrupt_crc", "unreadable", "corrupt gzip"),
        ("two_d", "geometry_mismatch", "3-D"),
        ("four_d", "geometry_mismatch", "4-D"),
        ("nan", "invalid_labels", "NaN"),
        ("float_fraction", "invalid_labels", "non-integer"),
        ("negative", "invalid_labels", "negative"),
        ("outside_protocol", "invalid_labels", "not in the protocol"),
        ("empty_file", "unreadable", "too short"),
        ("analyze_pair", "unreadable", "single-file"),
        ("complex", "invalid_labels", "not numeric"),
    ],
)
def test_broken_prediction_files_are_refused_with_a_status(tmp_path, make, status, words):
    lab = _labels()
    case = tmp_path / "case"
    case.mkdir()
    path = case / "combined_labels.nii.gz"
    good = gzip.compress(nib.Nifti1Image(lab, AFF).to_bytes())
    noisy = gzip.compress(nib.Nifti1Image(np.random.default_rng(0).integers(0, 10, (40, 40, 40), dtype=np.uint8), AFF).to_bytes())
    if make == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif make == "truncated_data":
        path.write_bytes(noisy[: len(noisy) // 2])
    elif make == "truncated_trailer":
        path.write_bytes(noisy[:-4])  # all data there, the gzip trailer (length) cut
    elif make == "not_gzip_not_nifti":
        path.write_bytes(b"this is a PNG, honest" * 40)
    elif make == "gzip_not_nifti":
        path.write_bytes(gzip.compress(b"\x00" * 2000))
    elif make == "corrupt_crc":
        broken = bytearray(good)
        broken[-8] ^= 0xFF  # the CRC32 of the gzip trailer
        path.write_bytes(bytes(broken))
    elif make == "two_d":
        _write_raw_nifti(path, lab[:, :, 0])
    elif make == "four_d":
        _write_raw_nifti(path, np.stack([lab, lab], axis=-1))
    elif make == "nan":
        f = lab.astype(np.float32)
        f[0, 0, 0] = np.nan
        _write_raw_nifti(path, f)
    elif make == "float_fraction":
        _write_raw_nifti(path, lab.astype(np.float32) * 0.5)
    elif make == "negative":
        _write_raw_nifti(path, lab.astype(np.int16) - 1)
    elif make == "outside_protocol":
        bad = lab.copy()
        bad[0, 0, 0] = 12
        _write_raw_nifti(path, bad)
    elif make == "empty_file":
        path.write_bytes(b"")
    elif make == "analyze_pair":
        raw = bytearray(nib.Nifti1Image(lab, AFF).to_bytes())
        raw[344:348] = b"ni1\x00"
        path.write_bytes(gzip.compress(bytes(raw)))
    elif make == "complex":
        _write_raw_nifti(path, lab.astype(np.complex64))
    with pytest.raises(io.CaseError) as err:
        io.read_labels(case)
    assert err.value.status == status, str(err.value)
    assert words in str(err.value)
    assert "Fix:" in str(err.value) and str(path) in str(err.value)


def test_binary_mask_with_other_values_is_refused_only_for_that_organ(tmp_path):
    lab = _labels()
    io.write_masks(tmp_path / "p", lab, AFF)
    _write_raw_nifti(tmp_path / "p" / "segmentations" / "liver.nii.gz", (lab == LABEL_IDS["liver"]).astype(np.uint8) * 255)
    with pytest.raises(io.InvalidLabels, match="only 0 and 1"):
        io.read_labels(tmp_path / "p")
    got = io.read_labels(tmp_path / "p", collect_organ_errors=True)
    assert set(got.organ_errors) == {"liver"} and got.organ_errors["liver"].status == "invalid_labels"
    assert not np.any(got.label_map == LABEL_IDS["liver"])
    np.testing.assert_array_equal(got.label_map == LABEL_IDS["spleen"], lab == LABEL_IDS["spleen"])


def test_decompression_bomb_header_is_refused_before_decompressing(tmp_path, monkeypatch):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((4000, 4000, 4000))  # 64 G voxels declared
    hdr["vox_offset"] = 352
    hdr["magic"] = b"n+1"
    raw = hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(raw))
    monkeypatch.setattr(io, "_inflate", lambda *a, **k: pytest.fail("the data must not be decompressed"))
    with pytest.raises(io.TooLarge, match="declares 64,000,000,000 voxels") as err:
        io.read_nifti(path)
    assert err.value.status == "too_large"


def test_decompressed_bytes_are_capped_while_streaming(tmp_path):
    lab = _labels()
    body = nib.Nifti1Image(lab, AFF).to_bytes() + b"\x00" * (8 << 20)  # 8 MiB hidden after the data
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(body))
    assert path.stat().st_size < 64 << 10  # tiny on disk
    with pytest.raises(io.TooLarge, match="more data than the NIfTI header declares"):
        io.read_nifti(path)


def test_declared_size_over_the_byte_limit(tmp_path):
    path = _write_raw_nifti(tmp_path / "f.nii.gz", np.zeros((40, 40, 40), np.float64))
    with pytest.raises(io.TooLarge, match="bytes of data"):
        io.read_nifti(path, io.ReadLimits(max_decompressed_bytes=100_000))
    assert io.read_nifti(path).data.shape == (40, 40, 40)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.nii.gz"
    path.write_bytes(os.urandom(300_000))
    with pytest.raises(io.TooLarge, match="over the limit"):
        io.read_nifti(path, io.ReadLimits(max_file_bytes=100_000))


def test_multi_member_gzip_is_read(tmp_path):
    lab = _labels()
    raw = nib.Nifti1Image(lab, AFF).to_bytes()
    path = tmp_path / "mm.nii.gz"
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    np.testing.assert_array_equal(io.read_nifti(path).data, lab)


def test_symlinks_are_refused_for_predictions(tmp_path):
    lab = _labels()
    io.write_combined_labels(tmp_path / "gt", lab, AFF)
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "combined_labels.nii.gz").symlink_to(tmp_path / "gt" / "combined_labels.nii.gz")
    with pytest.raises(io.UnreadableFile, match="symbolic link"):
        io.read_labels(tmp_path / "pred")
    io.write_masks(tmp_path / "gt2", lab, AFF)
    (tmp_path / "pred2").mkdir()
    (tmp_path / "pred2" / "segmentations").symlink_to(tmp_path / "gt2" / "segmentations")
    with pytest.raises(io.UnreadableFile, match="symbolic link"):
        io.read_labels(tmp_path / "pred2")
    assert io.read_labels(tmp_path / "pred", untrusted=False).label_map is not None  # trusted data may link


# ---------------------------------------------------------------- geometry


def _geom(shape=(12, 10, 8), aff=AFF):
    return io.Geometry(shape, np.asarray(aff, float))


def test_geometry_mismatch_messages_say_what_differs():
    gt = _geom()
    with pytest.raises(io.GeometryMismatch, match=r"shape \(12, 10, 9\) differs from the ground truth's \(12, 10, 8\)"):
        io.check_geometry(_geom((12, 10, 9)), gt)
    spaced = AFF.copy()
    spaced[2, 2] = 2.5
    with pytest.raises(io.GeometryMismatch, match=r"spacing \(2, 1.5, 2.5\) mm differs from the ground truth's \(2, 1.5, 3\) mm"):
        io.check_geometry(_geom(aff=spaced), gt)
    moved = AFF.copy()
    moved[0, 3] += 5
    with pytest.raises(io.GeometryMismatch, match=r"origin \(-25, -20, 10\) mm differs"):
        io.check_geometry(_geom(aff=moved), gt)
    flipped = AFF.copy()
    flipped[0, 0] = -2.0
    with pytest.raises(io.GeometryMismatch, match="orientation LAS differs from the ground truth's RAS") as err:
        io.check_geometry(_geom(aff=flipped), gt)
    assert err.value.status == "geometry_mismatch" and "copy the CT's affine" in str(err.value)
    tiny = AFF.copy()
    tiny[:3, 3] += 1e-5  # float32 header round-off
    io.check_geometry(_geom(aff=tiny), gt)


def test_prediction_on_another_grid_is_refused_naming_the_file(tmp_path):
    lab = _labels()
    io.write_combined_labels(tmp_path / "gt", lab, AFF)
    io.write_masks(tmp_path / "p", lab[:, :, :7], AFF)
    gt = io.read_labels(tmp_path / "gt", untrusted=False)
    with pytest.raises(io.GeometryMismatch) as err:
        io.read_labels(tmp_path / "p", reference=gt.geometry)
    assert err.value.organ is not None and "segmentations" in str(err.value) and "shape" in str(err.value)


def test_gzip_backend_is_isal():
    assert io.GZIP_BACKEND == "isal"
    data = nib.Nifti1Image(_labels(), AFF).to_bytes()
    assert zlib.decompress(io.nifti_bytes(_labels(), AFF), wbits=31)[:4] == data[:4]


def test_sha256_of_files_and_folders(tmp_path):
    io.write_masks(tmp_path / "a", _labels(), AFF)
    first = io.sha256_path(tmp_path / "a")
    assert first == io.sha256_path(tmp_path / "a")
    io.write_masks(tmp_path / "a", _labels()[::-1].copy(), AFF)
    assert io.sha256_path(tmp_path / "a") != first
