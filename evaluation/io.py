"""NIfTI I/O for Touchstone: label maps in both layouts, CTs, geometry checks, untrusted-file guards.

Layouts of a case's labels (ground truth or prediction; ids in :mod:`evaluation.labels`):

* ``masks``: ``<case>/segmentations/<organ>.nii.gz``, one binary mask per organ (the AbdomenAtlas /
  Touchstone layout). Masks may overlap. A missing organ file means an empty mask.
* ``combined``: ``<case>/combined_labels.nii.gz``, one label map, organ ``k`` stored as value ``k``.

Auto-detection (:func:`detect_layout`): ``combined_labels.nii.gz`` wins when a case folder holds
both; a folder that holds organ files directly (the ``segmentations`` folder itself) is ``masks``;
a file is ``combined``.

Every prediction file is untrusted (:class:`ReadLimits`). Reading a file, in order:

1. ``lstat``: a symbolic link or a non-regular file is refused (a link could point at the ground
   truth); the file size must be at most ``max_file_bytes``; it is opened with ``O_NOFOLLOW``.
2. The first 540 bytes are decompressed and parsed as a NIfTI-1 / NIfTI-2 header (a non-NIfTI file,
   an Analyze pair or a corrupt header is refused). The *declared* data size
   ``prod(dim) * itemsize`` is checked against ``max_voxels`` and ``max_decompressed_bytes``
   *before* the data is decompressed (the decompression-bomb guard).
3. The data is decompressed with ``max_length = vox_offset + declared size`` (never more), then at
   most 1 MiB more to reach the gzip trailer and verify the CRC; a stream that still goes on is
   refused as too large, one that ends early as truncated.

Dimensions: a label file must be 3-D. A 4-D (or 5-D...) file whose extra dimensions are all 1 is
squeezed to 3-D (several tools write ``(X, Y, Z, 1)``); anything else is refused.

Decompression uses ``isal`` (Intel ISA-L ``igzip``, ~3-4x faster than zlib for inflate) when it is
installed and the standard library ``zlib`` otherwise; :data:`GZIP_BACKEND` says which.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from evaluation.labels import COMBINED_LABELS_FILE, CT_FILE, LABEL_IDS, SEGMENTATIONS_DIR

try:  # ISA-L inflate/deflate: same API as zlib, several times faster
    from isal import isal_zlib as _zlib_impl

    GZIP_BACKEND = "isal"
except ImportError:  # pragma: no cover - isal is a core dependency; the fallback keeps us working
    _zlib_impl = zlib  # type: ignore[assignment]
    GZIP_BACKEND = "zlib"

_ZLIB_ERRORS: tuple[type[BaseException], ...] = (zlib.error,) + (
    (_zlib_impl.error,) if _zlib_impl is not zlib else ()
)
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_HDR, _NIFTI2_HDR = 348, 540
_TRAILER_SLACK = 1 << 20  # bytes decompressed past the declared data to reach the gzip trailer

Layout = Literal["masks", "combined"]

# --------------------------------------------------------------------------------------------------
# Statuses and errors
# --------------------------------------------------------------------------------------------------

class ScoreStatus(enum.StrEnum):
    """Every status a score row can carry (the one list: the scorer, the worker, the leaderboard's
    ``n_failed`` and the exports all read it). Every status but ``ok`` is a failed prediction scored
    with the protocol's worst values (:attr:`is_failure`)."""

    OK = "ok"
    MISSING_PREDICTION = "missing_prediction"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    GEOMETRY_MISMATCH = "geometry_mismatch"
    INVALID_LABELS = "invalid_labels"
    #: the worker's output check refused the case's files unread (a link, a device, an unexpected
    #: name, a file over the size cap, a run that broke an output limit)
    INVALID_PREDICTION = "invalid_prediction"

    @property
    def is_failure(self) -> bool:
        """A failed prediction (scored worst, counted in ``n_failed``): every status but ``ok``."""
        return self is not ScoreStatus.OK

    @property
    def description(self) -> str:
        return STATUSES[self.value]

    @classmethod
    def status_is_failure(cls, status: str | None) -> bool:
        """Whether a *stored* status marks a failed prediction: none (``None``, "") is not; a
        value that is no member (a row written by something else) is."""
        if status is None or status == "":
            return False
        try:
            return cls(str(status)).is_failure
        except ValueError:
            return True


STATUS_OK = ScoreStatus.OK
STATUS_MISSING_PREDICTION = ScoreStatus.MISSING_PREDICTION
STATUS_UNREADABLE = ScoreStatus.UNREADABLE
STATUS_TOO_LARGE = ScoreStatus.TOO_LARGE
STATUS_GEOMETRY_MISMATCH = ScoreStatus.GEOMETRY_MISMATCH
STATUS_INVALID_LABELS = ScoreStatus.INVALID_LABELS
STATUS_INVALID_PREDICTION = ScoreStatus.INVALID_PREDICTION

#: every status a score row can carry, with what it means
STATUSES: dict[str, str] = {
    "ok": "scored normally",
    "missing_prediction": "no prediction for the case (no folder, or no label file in it)",
    "unreadable": "not a readable NIfTI file (corrupt or truncated gzip, not NIfTI, a symlink)",
    "too_large": "file, declared voxel count or decompressed data over the read limits "
    "(the decompression-bomb guard)",
    "geometry_mismatch": "grid differs from the ground truth (shape, spacing, affine, "
    "orientation) or the file is not 3-D",
    "invalid_labels": "values outside the protocol: NaN, non-integer, negative, unknown label",
    "invalid_prediction": "refused unread by the service's output check (a link or special file, "
    "an unexpected name, a file over the size cap, or a run that broke an output limit)",
}


class CaseError(Exception):
    """A problem with one case's file, with a machine ``status`` and a message naming the fix.

    ``str(err)`` is ``"<path>: <problem>. Fix: <fix>"``; ``organ`` is set when the problem concerns
    one organ's mask only (the ``masks`` layout), so the other organs can still be scored.
    """

    status: ScoreStatus = STATUS_UNREADABLE

    def __init__(self, problem: str, fix: str, *, path: Path | str | None = None, organ: str | None = None):
        self.problem = problem
        self.fix = fix
        self.path = None if path is None else str(path)
        self.organ = organ
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}. Fix: {fix}")


class MissingPrediction(CaseError):
    status = STATUS_MISSING_PREDICTION


class UnreadableFile(CaseError):
    status = STATUS_UNREADABLE


class TooLarge(CaseError):
    status = STATUS_TOO_LARGE


class GeometryMismatch(CaseError):
    status = STATUS_GEOMETRY_MISMATCH


class InvalidLabels(CaseError):
    status = STATUS_INVALID_LABELS


class GroundTruthError(Exception):
    """The ground truth of a case cannot be used: an organizer's problem, never scored against a
    submission. Wraps the underlying :class:`CaseError` as ``cause``."""

    def __init__(self, case_id: str, cause: CaseError | str):
        self.case_id = case_id
        self.cause = cause
        super().__init__(f"ground truth of case {case_id!r} is unusable: {cause}")


# --------------------------------------------------------------------------------------------------
# Limits and geometry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadLimits:
    """Caps applied to every untrusted file before and while reading it.

    Defaults fit a 512×512×2000 uint8/int16 volume (a long CT) and keep one worker's memory bounded.
    """

    #: size of the file on disk (compressed), bytes
    max_file_bytes: int = 512 * 2**20
    #: declared voxel count prod(dim[1..n]) from the header
    max_voxels: int = 512 * 512 * 2000
    #: declared (and actually decompressed) header + data bytes
    max_decompressed_bytes: int = 1024 * 2**20
    #: follow symbolic links (never for predictions: a link can point at the ground truth)
    allow_symlinks: bool = False

    @classmethod
    def trusted(cls) -> ReadLimits:
        """Limits for organizer data (ground truth, CTs): large caps, symlinks allowed."""
        return cls(max_file_bytes=2**40, max_voxels=2**40, max_decompressed_bytes=2**40, allow_symlinks=True)


@dataclass(frozen=True)
class GeometryTolerance:
    """How close two grids must be to count as the same (mm for lengths)."""

    spacing_mm: float = 1e-3
    origin_mm: float = 1e-3
    direction: float = 1e-4  # max abs difference between unit direction cosines


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3-D volume: ``shape`` and the voxel-to-world (RAS+, mm) ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis: the column norms of ``affine[:3, :3]``."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as ``'RAS'`` or ``'LPS'`` (where each array axis points, nibabel)."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def directions(self) -> np.ndarray:
        """Unit direction cosines, one column per array axis."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def geometry_differences(pred: Geometry, gt: Geometry, tol: GeometryTolerance = GeometryTolerance()) -> list[str]:
    """What differs between two grids, in words; empty when they match within ``tol``."""
    if pred.shape != gt.shape:
        return [f"shape {pred.shape} differs from the ground truth's {gt.shape}"]
    diffs = []
    if pred.orientation != gt.orientation:
        diffs.append(f"orientation {pred.orientation} differs from the ground truth's {gt.orientation}")
    sp, sg = np.array(pred.spacing), np.array(gt.spacing)
    if np.max(np.abs(sp - sg)) > tol.spacing_mm:
        diffs.append(f"spacing {_fmt(sp)} mm differs from the ground truth's {_fmt(sg)} mm")
    if pred.orientation == gt.orientation and np.max(np.abs(pred.directions - gt.directions)) > tol.direction:
        diffs.append(
            "direction cosines differ from the ground truth's by "
            f"{np.max(np.abs(pred.directions - gt.directions)):.3g} (rotated grid)"
        )
    op, og = np.array(pred.origin), np.array(gt.origin)
    if np.max(np.abs(op - og)) > tol.origin_mm:
        diffs.append(f"origin {_fmt(op)} mm differs from the ground truth's {_fmt(og)} mm")
    return diffs


def check_geometry(
    pred: Geometry,
    gt: Geometry,
    *,
    tol: GeometryTolerance = GeometryTolerance(),
    path: Path | str | None = None,
    organ: str | None = None,
) -> None:
    """Raise :class:`GeometryMismatch` naming every difference when ``pred`` is not ``gt``'s grid."""
    diffs = geometry_differences(pred, gt, tol)
    if diffs:
        raise GeometryMismatch(
            "; ".join(diffs),
            "write the prediction on the input CT's grid: same shape, and copy the CT's affine/header "
            "(do not resample or reorient)",
            path=path,
            organ=organ,
        )


# --------------------------------------------------------------------------------------------------
# Guarded NIfTI reading
# --------------------------------------------------------------------------------------------------


@dataclass
class NiftiVolume:
    """A decoded 3-D NIfTI volume: raw-dtype ``data`` (scaling applied only if the header sets it)."""

    data: np.ndarray
    geometry: Geometry
    path: str


def _read_untrusted_bytes(path: Path, limits: ReadLimits) -> bytes:
    """The file's bytes, after the symlink / regular-file / size checks (one ``read``)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MissingPrediction("file does not exist", "write the file", path=path) from None
    except OSError as exc:
        raise UnreadableFile(f"cannot stat the file ({exc.strerror})", "make it readable", path=path) from None
    if stat.S_ISLNK(st.st_mode) and not limits.allow_symlinks:
        raise UnreadableFile("is a symbolic link", "write a regular file, not a link", path=path)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFile("is not a regular file", "write a regular .nii.gz file", path=path)
    if st.st_size > limits.max_file_bytes:
        raise TooLarge(
            f"file is {st.st_size:,} bytes, over the limit of {limits.max_file_bytes:,}",
            "write labels as uint8, gzip-compressed",
            path=path,
        )
    flags = os.O_RDONLY | (0 if limits.allow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UnreadableFile(f"cannot open the file ({exc.strerror})", "make it a readable regular file", path=path) from None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(min(limits.max_file_bytes, st.st_size) + 1)
    if len(raw) > limits.max_file_bytes:  # grew while we read it
        raise TooLarge("file grew over the size limit while being read", "write the file once", path=path)
    return raw


def _inflate_head(raw: bytes, n_bytes: int, path: Path) -> bytes:
    """The first (at most) ``n_bytes`` of a gzip stream, decompressing no more than that."""
    d = _zlib_impl.decompressobj(wbits=31)
    try:
        head = d.decompress(raw, n_bytes)
    except _ZLIB_ERRORS as exc:
        raise UnreadableFile(f"corrupt gzip data ({exc})", "re-write the file as a complete .nii.gz", path=path) from None
    if len(head) < _NIFTI1_HDR and not d.eof:
        raise _truncated(path, len(head), _NIFTI1_HDR)
    return head


def _truncated(path: Path, have: int, n_bytes: int) -> UnreadableFile:
    return UnreadableFile(
        f"the gzip stream is truncated ({have:,} of the {n_bytes:,} declared bytes, or its trailer, missing)",
        "re-write the file completely (was the writer killed mid-write?)",
        path=path,
    )


def _inflate(raw: bytes, n_bytes: int, path: Path) -> bytes:
    """Exactly ``n_bytes`` from a (possibly multi-member) gzip stream, decompressing at most
    ``n_bytes + _TRAILER_SLACK``.

    The member holding the last declared byte must end (gzip trailer, CRC verified by the inflater)
    within ``_TRAILER_SLACK`` bytes, else TooLarge; a stream ending early is truncated. Members after
    the declared data are not decompressed (ignored).
    """
    chunks: list[bytes] = []
    have = 0
    data = raw
    try:
        while have < n_bytes and data[:2] == _GZIP_MAGIC:
            d = _zlib_impl.decompressobj(wbits=31)
            out = d.decompress(data, n_bytes - have)
            chunks.append(out)
            have += len(out)
            if not d.eof:
                if have < n_bytes:  # input exhausted before the declared size
                    raise _truncated(path, have, n_bytes)
                extra = d.decompress(d.unconsumed_tail, _TRAILER_SLACK)
                if not d.eof:
                    if len(extra) >= _TRAILER_SLACK:
                        raise TooLarge(
                            "the gzip stream holds more data than the NIfTI header declares",
                            "write the image with nibabel or SimpleITK, without trailing data",
                            path=path,
                        )
                    raise _truncated(path, have, n_bytes)
            data = d.unused_data
    except _ZLIB_ERRORS as exc:
        raise UnreadableFile(f"corrupt gzip data ({exc})", "re-write the file as a complete .nii.gz", path=path) from None
    if have < n_bytes:
        raise _truncated(path, have, n_bytes)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _parse_header(block: bytes, path: Path):
    """The NIfTI-1/2 header class and instance for the first bytes of an image, or UnreadableFile."""
    if len(block) < _NIFTI1_HDR:
        raise UnreadableFile(
            f"only {len(block)} bytes: too short for a NIfTI header", "write a complete NIfTI-1 .nii.gz file", path=path
        )
    sizes = {int(np.frombuffer(block[:4], dtype=e + "i4")[0]) for e in "<>"}
    if _NIFTI1_HDR in sizes:
        img_class, n = nib.Nifti1Image, _NIFTI1_HDR
    elif _NIFTI2_HDR in sizes and len(block) >= _NIFTI2_HDR:
        img_class, n = nib.Nifti2Image, _NIFTI2_HDR
    else:
        raise UnreadableFile("not a NIfTI file (bad header size field)", "write a NIfTI-1 .nii.gz file", path=path)
    try:
        hdr = img_class.header_class(binaryblock=bytes(block[:n]), check=True)
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a corrupt header
        raise UnreadableFile(f"corrupt NIfTI header ({exc})", "write the file with nibabel or SimpleITK", path=path) from None
    magic = bytes(hdr["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        raise UnreadableFile(
            f"not a single-file NIfTI image (magic {magic!r})", "write one .nii.gz file, not a .hdr/.img pair", path=path
        )
    return img_class, hdr


def read_nifti(path: Path | str, limits: ReadLimits | None = None) -> NiftiVolume:
    """Read one 3-D NIfTI (``.nii.gz`` or ``.nii``) under ``limits`` (default :class:`ReadLimits`).

    Raises a :class:`CaseError` subclass for a missing, unsafe, oversized, corrupt, truncated,
    non-NIfTI or non-3-D file. Data keep the file's dtype unless the header sets a scaling.
    """
    path = Path(path)
    limits = limits or ReadLimits()
    raw = _read_untrusted_bytes(path, limits)
    gz = raw[:2] == _GZIP_MAGIC
    head = _inflate_head(raw, _NIFTI2_HDR, path) if gz else raw[:_NIFTI2_HDR]
    img_class, hdr = _parse_header(head, path)

    ndim = int(hdr["dim"][0])
    dims = tuple(int(v) for v in hdr["dim"][1 : ndim + 1])
    if ndim < 3 or any(v < 1 for v in dims):
        raise GeometryMismatch(
            f"has {ndim} dimension(s) {dims}; a 3-D volume is expected", "write a 3-D (X, Y, Z) volume", path=path
        )
    if any(v != 1 for v in dims[3:]):
        raise GeometryMismatch(
            f"is {ndim}-D with shape {dims}; only 3-D volumes (or 4-D with a trailing size-1 axis) are accepted",
            "write one 3-D volume per file (one-hot / probability channels are not accepted)",
            path=path,
        )
    try:
        dtype = hdr.get_data_dtype()
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFile(f"unknown NIfTI data type ({exc})", "write uint8 labels", path=path) from None
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise InvalidLabels(f"data type {dtype} is not numeric", "write uint8 labels", path=path)
    n_vox = int(np.prod(dims[:3], dtype=np.int64))
    if n_vox > limits.max_voxels:
        raise TooLarge(
            f"declares {n_vox:,} voxels {dims[:3]}, over the limit of {limits.max_voxels:,}",
            "write the prediction on the input CT's grid",
            path=path,
        )
    offset = int(hdr["vox_offset"])
    if offset < len(hdr.binaryblock) or offset > len(hdr.binaryblock) + (16 << 20):
        raise UnreadableFile(f"implausible vox_offset {offset}", "write the file with nibabel or SimpleITK", path=path)
    total = offset + n_vox * dtype.itemsize
    if total > limits.max_decompressed_bytes:
        raise TooLarge(
            f"declares {total:,} bytes of data ({n_vox:,} voxels × {dtype.itemsize} bytes), over the limit of "
            f"{limits.max_decompressed_bytes:,}",
            "write labels as uint8",
            path=path,
        )
    if gz:
        buf = _inflate(raw, total, path)
    else:
        if len(raw) < total:
            raise UnreadableFile(
                f"the data is truncated: {len(raw):,} bytes, the header declares {total:,}", "re-write the file", path=path
            )
        buf = raw
    del raw
    try:
        # zero-copy view of the decompressed bytes (read-only), Fortran order as NIfTI stores it
        data = np.ndarray(dims[:3], dtype=dtype, buffer=buf, offset=offset, order="F")
        if not dtype.isnative:
            data = data.astype(dtype.newbyteorder("="))
        slope, inter = hdr.get_slope_inter()
        if slope is not None and inter is not None and (slope, inter) != (1.0, 0.0):
            data = nib.volumeutils.apply_read_scaling(data, slope, inter)
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - anything nibabel/numpy can raise on a hostile file
        raise UnreadableFile(f"cannot decode the NIfTI data ({exc})", "write the file with nibabel or SimpleITK", path=path) from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise GeometryMismatch("the affine is singular or not finite", "copy the input CT's header", path=path)
    return NiftiVolume(data=data, geometry=Geometry(tuple(int(s) for s in data.shape), affine), path=str(path))  # type: ignore[arg-type]


def read_ct(path: Path | str, limits: ReadLimits | None = None) -> tuple[np.ndarray, Geometry]:
    """A CT volume in Hounsfield units as float32 (rescale slope/intercept applied), and its grid."""
    vol = read_nifti(path, limits or ReadLimits.trusted())
    return np.asarray(vol.data, dtype=np.float32), vol.geometry


# --------------------------------------------------------------------------------------------------
# Label validation
# --------------------------------------------------------------------------------------------------


def _as_integer_labels(data: np.ndarray, path: str, organ: str | None) -> np.ndarray:
    """Integer view of label data; floats must be finite whole numbers (else InvalidLabels)."""
    if data.dtype.kind in "biu":
        return data
    if not np.all(np.isfinite(data)):
        raise InvalidLabels("contains NaN or infinite values", "write integer labels (uint8)", path=path, organ=organ)
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise InvalidLabels(
            "float data with non-integer values (a probability map?)",
            "threshold it and write integer labels (uint8)",
            path=path,
            organ=organ,
        )
    if rounded.size and (rounded.min() < np.iinfo(np.int32).min or rounded.max() > np.iinfo(np.int32).max):
        raise InvalidLabels("values out of the integer range", "write uint8 labels", path=path, organ=organ)
    return rounded.astype(np.int32)


def _mask_from(data: np.ndarray, path: str, organ: str, *, strict: bool) -> np.ndarray:
    """A bool mask from binary-mask data; with ``strict`` only the values 0 and 1 are allowed."""
    data = _as_integer_labels(data, path, organ)
    if not data.size:
        return data.astype(bool)
    if strict:
        lo, hi = int(data.min()), int(data.max())
        if lo < 0:
            raise InvalidLabels(f"negative value {lo} in a binary mask", "write 0/1 uint8 masks", path=path, organ=organ)
        if hi > 1:
            raise InvalidLabels(
                f"value {hi} in a binary mask (only 0 and 1 are allowed)",
                "write (mask > 0).astype(uint8)",
                path=path,
                organ=organ,
            )
    if data.dtype == np.uint8 or data.dtype == np.int8:
        return data.view(bool) if strict else data != 0
    return data != 0


def _label_map_from(data: np.ndarray, path: str, allowed_ids: set[int] | None) -> np.ndarray:
    """An integer label map; with ``allowed_ids`` every non-zero value must be one of them."""
    data = _as_integer_labels(data, path, None)
    if not data.size or allowed_ids is None:
        return data
    lo, hi = int(data.min()), int(data.max())
    if lo < 0:
        raise InvalidLabels(f"negative label value {lo}", "write uint8 labels, 0 for background", path=path)
    allowed = set(allowed_ids) | {0}
    if hi > max(allowed):
        raise InvalidLabels(
            f"label value {hi} is not in the protocol (allowed: {sorted(allowed)})",
            "write only the protocol's label ids",
            path=path,
        )
    if not set(range(hi + 1)) <= allowed:  # gaps in the id range: look at the values present
        present = np.flatnonzero(np.bincount(data.ravel(), minlength=hi + 1))
        unknown = sorted(set(int(v) for v in present) - allowed)
        if unknown:
            raise InvalidLabels(
                f"label value(s) {unknown[:10]} are not in the protocol (allowed: {sorted(allowed)})",
                "write only the protocol's label ids",
                path=path,
            )
    if data.dtype != np.uint8 and hi <= 255:
        data = data.astype(np.uint8)
    return data


def _keep_only(label_map: np.ndarray, ids: set[int]) -> np.ndarray:
    """Trusted ground truth: labels the protocol does not score (AbdomenAtlas has more classes)
    become background; the map is made uint8 when the ids allow."""
    small = np.uint8 if max(ids | {0}) <= 255 else np.int32
    if label_map.size == 0:
        return label_map.astype(small)
    lo, hi = int(label_map.min()), int(label_map.max())
    if lo >= 0 and set(range(1, hi + 1)) <= ids:
        return label_map if label_map.dtype == small else label_map.astype(small)
    known = np.isin(label_map, sorted(ids))
    return np.where(known, label_map, 0).astype(small)


# --------------------------------------------------------------------------------------------------
# Label layouts
# --------------------------------------------------------------------------------------------------


@dataclass
class CaseLabels:
    """A case's labels as read: either an integer ``label_map`` (combined layout, or disjoint masks
    merged) or per-organ ``masks`` (overlapping masks), on ``geometry``.

    ``missing_organs``: organs with no mask file (``masks`` layout), scored as empty.
    ``organ_errors``: organs whose mask file was refused (``masks`` layout, when collected).
    """

    layout: Layout
    geometry: Geometry
    label_map: np.ndarray | None = None
    masks: dict[str, np.ndarray] | None = None
    missing_organs: tuple[str, ...] = ()
    organ_errors: dict[str, CaseError] = field(default_factory=dict)
    source: str = ""

    def metrics_input(self) -> np.ndarray | Mapping[str, np.ndarray]:
        """What :func:`evaluation.metrics.compute_case_metrics` takes: the label map or the masks."""
        return self.label_map if self.label_map is not None else self.masks  # type: ignore[return-value]


def _is_link(p: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(p).st_mode)
    except OSError:
        return False


def detect_layout(path: Path | str) -> tuple[Layout, Path] | None:
    """``("combined", file)`` or ``("masks", segmentations_dir)`` for a case folder, a
    ``segmentations`` folder or a label file; ``None`` when there is no label file at all."""
    path = Path(path)
    if path.is_file() or (_is_link(path) and not path.is_dir()):
        return "combined", path
    if not path.is_dir():
        return None
    if (path / COMBINED_LABELS_FILE).exists() or _is_link(path / COMBINED_LABELS_FILE):
        return "combined", path / COMBINED_LABELS_FILE
    if (path / SEGMENTATIONS_DIR).is_dir():
        return "masks", path / SEGMENTATIONS_DIR
    if any(path.glob("*.nii.gz")) and not (path / CT_FILE).exists():
        return "masks", path
    return None


def read_labels(
    path: Path | str,
    organs: Mapping[str, int] = LABEL_IDS,
    *,
    limits: ReadLimits | None = None,
    untrusted: bool = True,
    reference: Geometry | None = None,
    tolerance: GeometryTolerance = GeometryTolerance(),
    collect_organ_errors: bool = False,
) -> CaseLabels:
    """Read a case's labels in either layout (auto-detected, see :func:`detect_layout`).

    ``organs`` maps the organs to read to their label ids (a protocol's ``organs``). With
    ``untrusted`` (predictions), values are validated strictly: masks hold only 0/1, a label map
    only 0 and the ids in ``organs``; NaN, non-integer floats and negatives are refused. Trusted
    ground truth keeps any value (a mask is ``data != 0``; other label ids are ignored).
    ``reference``: the ground truth's grid; every file must match it (else GeometryMismatch).
    Without it, the first mask file's grid is the reference for the others.
    ``collect_organ_errors`` (``masks`` layout): a refused organ file is recorded in
    ``organ_errors`` and that organ left out, instead of raising.

    Disjoint masks are merged into one uint8 label map (9× less memory than 9 bool masks);
    overlapping masks stay per organ. Raises MissingPrediction when there is no label file.
    """
    limits = limits or (ReadLimits() if untrusted else ReadLimits.trusted())
    found = detect_layout(path)
    if found is None:
        raise MissingPrediction(
            f"no {COMBINED_LABELS_FILE} and no {SEGMENTATIONS_DIR}/<organ>.nii.gz",
            f"write {SEGMENTATIONS_DIR}/<organ>.nii.gz or {COMBINED_LABELS_FILE} in the case folder",
            path=path,
        )
    layout, source = found
    if layout == "combined":
        vol = read_nifti(source, limits)
        if reference is not None:
            check_geometry(vol.geometry, reference, tol=tolerance, path=source)
        label_map = _label_map_from(vol.data, str(source), set(organs.values()) if untrusted else None)
        if not untrusted:
            label_map = _keep_only(label_map, set(organs.values()))
        return CaseLabels(layout="combined", geometry=vol.geometry, label_map=label_map, source=str(source))

    if not limits.allow_symlinks and _is_link(source):
        raise UnreadableFile("the segmentations folder is a symbolic link", "write a real folder", path=source)
    geometry = reference
    label_map: np.ndarray | None = None
    masks: dict[str, np.ndarray] | None = None
    missing: list[str] = []
    errors: dict[str, CaseError] = {}
    for organ, label_id in organs.items():
        file = source / f"{organ}.nii.gz"
        if not file.exists() and not _is_link(file):
            missing.append(organ)
            continue
        try:
            vol = read_nifti(file, limits)
            if geometry is not None:
                check_geometry(vol.geometry, geometry, tol=tolerance, path=file, organ=organ)
            mask = _mask_from(vol.data, str(file), organ, strict=untrusted)
        except CaseError as err:
            err.organ = organ
            if not collect_organ_errors:
                raise
            errors[organ] = err
            continue
        if geometry is None:
            geometry = vol.geometry
        if masks is None:  # try to keep one label map
            if label_map is None:
                order = "F" if mask.flags.f_contiguous else "C"  # same memory order as the masks: fast merging
                label_map = np.zeros(mask.shape, np.uint8 if max(organs.values()) <= 255 else np.int32, order=order)
            box = _bbox(mask)
            if box is None:
                continue
            sub, msub = label_map[box], mask[box]
            if np.logical_and(sub, msub).any():  # overlap: fall back to per-organ masks
                masks = {o: label_map == i for o, i in organs.items() if o not in missing and o not in errors}
                masks[organ] = mask
                label_map = None
            else:
                np.copyto(sub, label_id, where=msub)
        else:
            masks[organ] = mask
    if geometry is None or len(missing) == len(organs):
        if errors:
            if len(errors) == len(organs) or not collect_organ_errors:
                raise next(iter(errors.values()))
        raise MissingPrediction(
            f"no mask file for any of the organs {list(organs)}",
            f"write {SEGMENTATIONS_DIR}/<organ>.nii.gz files named after the organs",
            path=source,
        )
    if label_map is None and masks is None:
        # every file that exists was refused (collected in ``errors``): the others are empty masks
        label_map = np.zeros(geometry.shape, np.uint8 if max(organs.values()) <= 255 else np.int32)
    return CaseLabels(
        layout="masks",
        geometry=geometry,
        label_map=label_map,
        masks=masks,
        missing_organs=tuple(missing),
        organ_errors=errors,
        source=str(source),
    )


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Smallest box holding every True voxel of a 3-D mask, or None when it is empty.

    The slowest-varying axis of the memory layout is projected first, over the whole volume (one
    pass); the two other projections only look at that slab, which is small for most organs."""
    slow = 2 if mask.flags.f_contiguous else 0
    others = tuple(a for a in range(3) if a != slow)
    hit = np.flatnonzero(np.any(mask, axis=others))
    if hit.size == 0:
        return None
    box: list[slice] = [slice(None)] * 3
    box[slow] = slice(int(hit[0]), int(hit[-1]) + 1)
    slab = mask[tuple(box)]
    for axis in others:
        hit = np.flatnonzero(np.any(slab, axis=tuple(a for a in range(3) if a != axis)))
        box[axis] = slice(int(hit[0]), int(hit[-1]) + 1)
    return tuple(box)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, compresslevel: int = 1) -> bytes:
    """A gzip-compressed NIfTI-1 image of ``data`` on ``affine`` (qform = sform = scanner, mm)."""
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if data.dtype.kind in "iu":
        img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    return _zlib_impl.compress(raw, compresslevel, wbits=31) if GZIP_BACKEND == "isal" else _gzip_compress(raw, compresslevel)


def _gzip_compress(raw: bytes, level: int) -> bytes:  # pragma: no cover - used without isal only
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def write_nifti(path: Path | str, data: np.ndarray, affine: np.ndarray, *, compresslevel: int = 1) -> Path:
    """Write ``data`` as ``path`` (.nii.gz) atomically (temporary file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(nifti_bytes(data, affine, compresslevel=compresslevel))
    os.replace(tmp, path)
    return path


def write_ct(case_dir: Path | str, hu: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``<case_dir>/ct.nii.gz`` as int16 Hounsfield units."""
    hu16 = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    return write_nifti(Path(case_dir) / CT_FILE, hu16, affine)


def write_combined_labels(case_dir: Path | str, label_map: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``<case_dir>/combined_labels.nii.gz`` (uint8 when the ids allow)."""
    label_map = np.asarray(label_map)
    dtype = np.uint8 if label_map.size == 0 or int(label_map.max()) <= 255 else np.int16
    return write_nifti(Path(case_dir) / COMBINED_LABELS_FILE, label_map.astype(dtype, copy=False), affine)


def write_masks(
    case_dir: Path | str,
    labels: np.ndarray | Mapping[str, np.ndarray],
    affine: np.ndarray,
    organs: Mapping[str, int] = LABEL_IDS,
    *,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write ``<case_dir>/segmentations/<organ>.nii.gz`` uint8 0/1 masks, from a label map
    (``labels == id``) or a mapping organ → mask. Organs in ``skip`` get no file."""
    seg_dir = Path(case_dir) / SEGMENTATIONS_DIR
    seg_dir.mkdir(parents=True, exist_ok=True)
    for organ, label_id in organs.items():
        if organ in skip:
            continue
        if isinstance(labels, Mapping):
            if organ not in labels:
                continue
            mask = np.asarray(labels[organ]) != 0
        else:
            mask = labels == label_id
        write_nifti(seg_dir / f"{organ}.nii.gz", mask.astype(np.uint8), affine)
    return seg_dir


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path | str) -> str:
    """sha256 of a file, or of a folder as ``sha256("<relative path>  <file sha256>\\n" ...)`` over
    its regular files in sorted order (so renaming or changing any file changes it)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}  {sha256_file(file)}\n".encode())
    return h.hexdigest()
