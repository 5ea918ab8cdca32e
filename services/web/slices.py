"""Slices of a case for the case viewer: the CT under a window preset, with the ground truth and a
prediction drawn as contours per organ, as PNG (numpy slicing, PIL encoding).

Geometry. Every volume is viewed in RAS+ array order (nibabel's closest-axis orientation of its
affine; flips and transposes are numpy views, nothing is resampled or copied): array axis 0 runs
toward the patient's right, 1 anterior, 2 superior. A plane fixes one of them:

============ ============== ====================================================================
plane        fixed axis     shown as (radiological convention)
============ ============== ====================================================================
axial        2 (superior)   anterior at the top, the patient's right on the image's left
coronal      1 (anterior)   superior at the top, the patient's right on the image's left
sagittal     0 (right)      superior at the top, anterior on the image's left
============ ============== ====================================================================

Slice ``i`` of a plane is array index ``i`` along its fixed axis (0 = most inferior / posterior /
left). The image keeps the physical proportions of the voxels (mm), scaled so that its longer side
is :data:`DISPLAY_SIDE_PX` pixels (CT bilinear, labels nearest-neighbour).

Window. Hounsfield units are mapped linearly from ``level - width/2`` (black) to
``level + width/2`` (white) and clipped; :data:`ABDOMEN_WINDOW` is W400/L40.

Contours. Per organ, in that organ's colour (:data:`ORGAN_COLOURS`, the one table the page's
legend also reads): the ground truth as a solid line of :data:`LINE_PX` pixels on the inner edge of
its mask, the prediction as a dashed line of the same width on the outer edge of its mask -- so a
perfect prediction shows both lines side by side, never one hidden under the other.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image

from evaluation.io import CaseLabels, Geometry
from evaluation.labels import LABEL_IDS, ORGANS

#: organ -> RGB; one table for the contours and the legend (Touchstone's organs, colour-blind-safer
#: hues after Okabe-Ito and Tol's bright scheme, distinct on a grey CT)
ORGAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "aorta": (230, 25, 75),
    "gall_bladder": (60, 220, 75),
    "kidney_left": (255, 225, 25),
    "kidney_right": (245, 130, 48),
    "liver": (0, 130, 200),
    "pancreas": (145, 30, 180),
    "postcava": (70, 240, 240),
    "spleen": (240, 50, 230),
    "stomach": (170, 255, 195),
}
assert set(ORGAN_COLOURS) == set(ORGANS)
#: colours of label classes outside that table (a protocol's lesion classes), picked by name
EXTRA_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (255, 0, 0), (0, 255, 0), (255, 128, 255))

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: plane -> the RAS+ array axis it fixes
PLANE_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
#: longer side of a rendered slice, pixels
DISPLAY_SIDE_PX = 384
#: contour width, pixels (on the displayed image)
LINE_PX = 2
#: dash period of the prediction's contour, pixels (on, then off)
DASH_PX = 4


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units: ``level`` is the centre, ``width`` the range."""

    width: float
    level: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2

    def label(self) -> str:
        return f"W{self.width:g}/L{self.level:g}"


#: soft-tissue abdomen preset
ABDOMEN_WINDOW = Window(width=400, level=40)


def colour(organ: str) -> tuple[int, int, int]:
    """The RGB colour of a label class: :data:`ORGAN_COLOURS`, else one of :data:`EXTRA_COLOURS`."""
    if organ in ORGAN_COLOURS:
        return ORGAN_COLOURS[organ]
    return EXTRA_COLOURS[zlib.crc32(organ.encode()) % len(EXTRA_COLOURS)]


def apply_window(hu: np.ndarray, window: Window = ABDOMEN_WINDOW) -> np.ndarray:
    """uint8 grey levels: ``255 * clip((hu - low) / width, 0, 1)``, rounded to nearest."""
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(window.low)) * np.float32(255.0 / window.width)
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def ras_view(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` with its axes flipped and transposed to RAS+ (a view, closest axes of ``affine``)."""
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                             nib.orientations.axcodes2ornt("RAS"))
    return nib.orientations.apply_orientation(data, to_ras)


def ras_spacing(geometry: Geometry) -> tuple[float, float, float]:
    """Voxel size (mm) along the RAS+ axes of :func:`ras_view`."""
    axes = nib.orientations.io_orientation(geometry.affine)[:, 0].astype(int)
    spacing = [0.0, 0.0, 0.0]
    for array_axis, world_axis in enumerate(axes):
        spacing[world_axis] = geometry.spacing[array_axis]
    return tuple(spacing)  # type: ignore[return-value]


def plane_of(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` as a view (basic indexing; ``np.take`` would first copy a
    non-contiguous volume whole -- seconds for a full-size CT)."""
    return volume[(slice(None),) * axis + (index,)]


class OrganMasks:
    """A case's labels (:class:`evaluation.io.CaseLabels`, either a label map or per-organ masks)
    viewed in RAS+, answering 2-D masks per organ and bounding-box centres."""

    def __init__(self, labels: CaseLabels, organs: Mapping[str, int] = LABEL_IDS) -> None:
        affine = labels.geometry.affine
        self.organs = dict(organs)
        self.label_map = None if labels.label_map is None else ras_view(labels.label_map, affine)
        self.masks = None if labels.masks is None else {o: ras_view(m, affine) for o, m in labels.masks.items()}
        self.unreadable = tuple(labels.organ_errors)  # organs whose file was refused: not drawn

    def slice(self, axis: int, index: int) -> dict[str, np.ndarray]:
        """organ -> 2-D bool mask of slice ``index`` along RAS axis ``axis`` (organs present only)."""
        found: dict[str, np.ndarray] = {}
        if self.label_map is not None:
            plane = plane_of(self.label_map, axis, index)
            for organ, label_id in self.organs.items():
                mask = plane == label_id
                if mask.any():
                    found[organ] = mask
        elif self.masks is not None:
            for organ, volume in self.masks.items():
                mask = np.asarray(plane_of(volume, axis, index), dtype=bool)
                if mask.any():
                    found[organ] = mask
        return found

    def centre(self, organ: str) -> tuple[int, int, int] | None:
        """Centre (RAS+ array indices) of the organ's bounding box, or None when it is empty."""
        if self.label_map is not None:
            if organ not in self.organs:
                return None
            volume = self.label_map == self.organs[organ]
        elif self.masks is not None and organ in self.masks:
            volume = np.asarray(self.masks[organ], dtype=bool)
        else:
            return None
        centre = []
        for axis in range(3):
            hit = np.flatnonzero(volume.any(axis=tuple(a for a in range(3) if a != axis)))
            if hit.size == 0:
                return None
            centre.append(int((hit[0] + hit[-1]) // 2))
        return tuple(centre)  # type: ignore[return-value]


def display_orient(plane: np.ndarray) -> np.ndarray:
    """A 2-D slice of a RAS+ volume (axes (a, b), the two not fixed) as an image: rows along b
    descending (superior / anterior at the top), columns along a descending (the patient's right,
    or anterior, on the left)."""
    return plane.T[::-1, ::-1]


def display_size(shape: tuple[int, int], row_mm: float, col_mm: float, side: int = DISPLAY_SIDE_PX) -> tuple[int, int]:
    """(height, width) in pixels keeping the physical aspect, longer side ``side``."""
    height_mm, width_mm = shape[0] * row_mm, shape[1] * col_mm
    scale = side / max(height_mm, width_mm)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def _shifted(mask: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``mask`` moved by (dr, dc), False where it moved in from outside."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dr, 0):h + min(dr, 0), max(dc, 0):w + min(dc, 0)] = mask[max(-dr, 0):h - max(dr, 0), max(-dc, 0):w - max(dc, 0)]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion (pixels outside the image count as background)."""
    return mask & _shifted(mask, 1, 0) & _shifted(mask, -1, 0) & _shifted(mask, 0, 1) & _shifted(mask, 0, -1)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return mask | _shifted(mask, 1, 0) | _shifted(mask, -1, 0) | _shifted(mask, 0, 1) | _shifted(mask, 0, -1)


def inner_contour(mask: np.ndarray, width: int = LINE_PX) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` 4-neighbour steps of its edge."""
    core = mask
    for _ in range(width):
        core = _erode(core)
    return mask & ~core


def outer_contour(mask: np.ndarray, width: int = LINE_PX) -> np.ndarray:
    """Pixels outside ``mask`` within ``width`` 4-neighbour steps of it."""
    grown = mask
    for _ in range(width):
        grown = _dilate(grown)
    return grown & ~mask


def dash_pattern(shape: tuple[int, int], period: int = DASH_PX) -> np.ndarray:
    """A checkerboard of ``period``-pixel squares: a line through it is on and off every ``period`` px."""
    rows = (np.arange(shape[0]) // period)[:, None]
    cols = (np.arange(shape[1]) // period)[None, :]
    return (rows + cols) % 2 == 0


def _resize(image: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    height, width = size
    if image.shape == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def render_slice(
    hu: np.ndarray,
    truth: Mapping[str, np.ndarray],
    prediction: Mapping[str, np.ndarray] | None,
    row_mm: float,
    col_mm: float,
    window: Window = ABDOMEN_WINDOW,
    side: int = DISPLAY_SIDE_PX,
) -> np.ndarray:
    """An RGB image (uint8, H x W x 3) of one slice already in display orientation.

    ``hu``: the CT slice (Hounsfield units); ``truth`` / ``prediction``: organ -> bool mask of the
    same shape (``prediction`` None: not drawn). ``row_mm`` / ``col_mm``: pixel size of the slice.
    """
    size = display_size(hu.shape, row_mm, col_mm, side)
    grey = _resize(apply_window(hu, window), size, Image.Resampling.BILINEAR)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    dashes = dash_pattern(size)
    for layer, dashed in ((truth, False), (prediction or {}, True)):
        for organ in sorted(layer, key=_drawing_order):
            mask = _resize(np.asarray(layer[organ], dtype=np.uint8), size, Image.Resampling.NEAREST).astype(bool)
            line = outer_contour(mask) & dashes if dashed else inner_contour(mask)
            rgb[line] = colour(organ)
    return rgb


def _drawing_order(organ: str) -> tuple[int, str]:
    return (ORGANS.index(organ) if organ in ORGANS else len(ORGANS), organ)


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


@dataclass
class CaseVolumes:
    """What one case viewer needs, in RAS+: the CT (raw dtype, HU after the header's scaling), the
    ground truth, and the prediction (None when there is none to show)."""

    ct: np.ndarray
    spacing: tuple[float, float, float]
    truth: OrganMasks
    prediction: OrganMasks | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.ct.shape)  # type: ignore[return-value]

    def n_slices(self, plane: str) -> int:
        return self.shape[PLANE_AXIS[plane]]

    def default_index(self, plane: str, organ: str | None) -> int:
        """The slice through the centre of ``organ`` (its ground truth, else its prediction), else
        through the centre of the volume."""
        axis = PLANE_AXIS[plane]
        if organ:
            for labels in (self.truth, self.prediction):
                centre = labels.centre(organ) if labels is not None else None
                if centre is not None:
                    return centre[axis]
        return self.shape[axis] // 2

    def render(self, plane: str, index: int, window: Window = ABDOMEN_WINDOW) -> bytes:
        """PNG of slice ``index`` of ``plane`` (0 <= index < :meth:`n_slices`, checked by the caller)."""
        axis = PLANE_AXIS[plane]
        a, b = (x for x in range(3) if x != axis)
        hu = display_orient(plane_of(self.ct, axis, index))
        truth = {o: display_orient(m) for o, m in self.truth.slice(axis, index).items()}
        prediction = None if self.prediction is None else {
            o: display_orient(m) for o, m in self.prediction.slice(axis, index).items()}
        rgb = render_slice(hu, truth, prediction, row_mm=self.spacing[b], col_mm=self.spacing[a], window=window)
        return png_bytes(rgb)
