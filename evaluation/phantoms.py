"""Synthetic abdominal CT phantoms with the 9 Touchstone organs, and imperfect predictions of them.

A phantom is built in patient world coordinates, NIfTI RAS+ in mm: +x toward the patient's
right, +y anterior, +z superior (head); the origin is on the spine axis at about the level of L1.

Anatomy (adult, before the per-case scale of about ±7 %; semi-axes in mm):

========== ============================== ============================== ==========
organ      centre (x right, y ant, z sup)  shape                          volume
========== ============================== ============================== ==========
liver      (+70, +5, +60) + left lobe      lobulated ellipsoids 75×85×65   ~1.6 L
spleen     (-95, -40, +50), left, post.   concave ellipsoid 25×45×50     ~0.2 L
kidneys    (±65, -65, -15/-30)            bean: ellipsoid 28×30×55 − hilum ~0.17 L each
aorta      (-15, -38), z top → -120        tube, radius ~11                thin
postcava   (+22, -38), z top → -130        elliptic tube 13×9               thin
pancreas   head (+35,-5,+10) → tail (-80,-30,+25)  tapered tube r 15→8      ~70 mL
stomach    (-55, +40, +55), left upper    two lobulated ellipsoids (J)    ~0.4 L
gallbladder(+45, +38, +5), under the liver small pear 15×15×32          ~30 mL
spine      (0, -70), all z                vertebral body r 18, HU ~700
========== ============================== ============================== ==========

Shapes are ellipsoids perturbed by smooth low-frequency noise (a sum of separable products of
sines, evaluated on 1-D axes and broadcast, so it costs a few array operations per organ), computed
only inside each organ's bounding box. Organs are written in a fixed priority (vessels first, liver
last) only where no other organ is, so the label map is a partition and the per-organ masks are
disjoint. HU values depend on the contrast phase (e.g. aorta ~200 arterial, liver ~60 plain,
kidney ~150 with contrast; fat -100; air -1000 outside the body). Gaussian noise of a per-hospital
sigma is added.

Per-hospital variation: in-plane field of view, slice thickness (slice count), scan length,
noise, the usual contrast phase, manufacturer and scanner, and the stored orientation (RAS or LPS
affines). Per-case metadata: hospital, age, sex, race, manufacturer, scanner, contrast phase,
diagnosis (some diagnoses change the anatomy: hepatomegaly, splenomegaly, lesions).

Tumour phantoms (``lesions=True``; ``touchstone phantoms --lesions``): lesion classes
(:data:`evaluation.labels.LESION_LABEL_IDS`: liver, kidney and pancreatic lesions) are inserted
inside their organs with a label of their own (the organ keeps the rest of its voxels). About a
quarter of the cases have no lesion at all; the others have several per organ (liver Poisson(1.6),
each kidney Poisson(0.5), pancreas Poisson(0.5), at least one in the case), each a lobulated
ball of diameter log-uniform in [4, 45] mm (smaller than a voxel: not in the labels, as in real
annotations), clipped to its organ. Their HU follow :data:`LESION_HU` by contrast phase
(hypo-attenuating in the portal-venous phase, a liver lesion hyper-enhancing in the arterial one,
kidney lesions nearly iso-dense without contrast). Lesions are drawn from a child stream of the
case's random stream (``rng.spawn``), so the organs, metadata and noise of a case are the same
with and without lesions outside the lesion voxels (the CT of a ``diagnosis`` lesion may move, as
it is placed among the organ voxels left). The manifest of a tumour set has the
lesion counts per class (``n_<class>`` columns).

Everything is deterministic: hospitals depend on ``(seed, n_hospitals)``, case ``i`` on
``(seed, n_hospitals, i)`` only, so the first cases of a larger set equal a smaller set's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from evaluation import io
from evaluation.manifest import METADATA_FIELDS
from evaluation.labels import (
    COMBINED_LABELS_FILE,
    CT_FILE,
    LABEL_IDS,
    LESION_HOSTS,
    LESION_LABEL_IDS,
    ORGANS,
    SEGMENTATIONS_DIR,
)

Size = Literal["tiny", "small", "full"]

#: nominal array shape (x, y, z) per size; z varies with the hospital's slice thickness and scan length
SIZES: dict[str, tuple[int, int, int]] = {"tiny": (64, 64, 64), "small": (128, 128, 80), "full": (512, 512, 300)}

#: order in which organs claim voxels (first wins): thin vessels must not be eaten by big organs
PRIORITY: tuple[str, ...] = (
    "aorta",
    "postcava",
    "kidney_left",
    "kidney_right",
    "spleen",
    "pancreas",
    "gall_bladder",
    "stomach",
    "liver",
)

PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")

#: mean HU per tissue and contrast phase (literature ballpark values)
ORGAN_HU: dict[str, dict[str, float]] = {
    "aorta": {"non_contrast": 45, "arterial": 250, "portal_venous": 160, "delayed": 110},
    "postcava": {"non_contrast": 40, "arterial": 80, "portal_venous": 150, "delayed": 110},
    "liver": {"non_contrast": 60, "arterial": 75, "portal_venous": 110, "delayed": 90},
    "spleen": {"non_contrast": 50, "arterial": 110, "portal_venous": 120, "delayed": 95},
    "kidney_left": {"non_contrast": 35, "arterial": 170, "portal_venous": 150, "delayed": 140},
    "kidney_right": {"non_contrast": 35, "arterial": 170, "portal_venous": 150, "delayed": 140},
    "pancreas": {"non_contrast": 45, "arterial": 110, "portal_venous": 100, "delayed": 80},
    "stomach": {"non_contrast": 25, "arterial": 35, "portal_venous": 45, "delayed": 40},
    "gall_bladder": {"non_contrast": 10, "arterial": 10, "portal_venous": 12, "delayed": 15},
}
TISSUE_HU: dict[str, float] = {"air": -1000, "fat": -100, "muscle": 50, "bone": 700, "csf": 15, "lung": -850, "lesion": 25}

#: mean HU of each lesion class per contrast phase: liver lesions hypo-attenuating except in the
#: arterial phase (hyper-enhancing, as hepatocellular carcinoma), renal masses enhancing less than
#: the cortex (nearly iso-dense without contrast), pancreatic adenocarcinoma hypo-attenuating
LESION_HU: dict[str, dict[str, float]] = {
    "liver_lesion": {"non_contrast": 42, "arterial": 115, "portal_venous": 65, "delayed": 70},
    "kidney_lesion": {"non_contrast": 32, "arterial": 120, "portal_venous": 95, "delayed": 85},
    "pancreatic_lesion": {"non_contrast": 38, "arterial": 65, "portal_venous": 70, "delayed": 62},
}
#: expected lesions per host organ in a case that has lesions (Poisson means)
LESIONS_PER_ORGAN: dict[str, float] = {"liver": 1.6, "kidney_left": 0.5, "kidney_right": 0.5, "pancreas": 0.5}
#: share of tumour-set cases without any lesion
NO_LESION_SHARE = 0.25
#: lesion diameters are log-uniform in this range (mm)
LESION_DIAMETER_MM = (4.0, 45.0)

MANUFACTURERS: dict[str, tuple[str, ...]] = {
    "GE": ("Revolution CT", "LightSpeed VCT", "Discovery CT750 HD"),
    "Siemens": ("SOMATOM Force", "SOMATOM Definition AS", "SOMATOM go.Top"),
    "Philips": ("IQon Spectral CT", "Brilliance 64", "Incisive CT"),
    "Canon": ("Aquilion ONE", "Aquilion Prime SP"),
}
RACES = ("White", "Black", "Asian", "Hispanic", "Other")
DIAGNOSES: dict[str, float] = {  # diagnosis -> probability
    "normal": 0.45,
    "liver_lesion": 0.12,
    "hepatomegaly": 0.08,
    "splenomegaly": 0.08,
    "renal_cyst": 0.1,
    "pancreatic_tumor": 0.07,
    "cholelithiasis": 0.1,
}


@dataclass(frozen=True)
class Hospital:
    """Acquisition habits of one hospital."""

    name: str
    manufacturer: str
    scanner: str
    fov_mm: float  # in-plane field of view (square)
    slice_thickness_mm: float  # at full size; smaller sizes scale it
    scan_length_mm: float
    noise_hu: float
    phase_weights: tuple[float, ...]  # over PHASES
    orientation: Literal["RAS", "LPS"]
    race_weights: tuple[float, ...]  # over RACES


@dataclass(frozen=True)
class PhantomCase:
    """One generated case: CT in HU (int16), label map (uint8, ids of LABEL_IDS), grid, metadata."""

    case_id: str
    ct: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Hospitals and metadata
# --------------------------------------------------------------------------------------------------


def make_hospitals(n: int, seed: int = 0) -> list[Hospital]:
    """``n`` hospitals with distinct acquisition habits, deterministic in ``(seed, n)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, 7919]))
    makers = list(MANUFACTURERS)
    hospitals = []
    for k in range(n):
        maker = makers[(k + int(rng.integers(len(makers)))) % len(makers)]
        main_phase = int(rng.choice(len(PHASES), p=[0.15, 0.25, 0.5, 0.1]))
        weights = np.full(len(PHASES), 0.1 / (len(PHASES) - 1))
        weights[main_phase] = 0.9
        race = rng.dirichlet(np.array([4.0, 1.5, 1.5, 1.5, 0.5]))
        hospitals.append(
            Hospital(
                name=f"hospital_{chr(ord('A') + k % 26)}{'' if k < 26 else k // 26}",
                manufacturer=maker,
                scanner=str(rng.choice(MANUFACTURERS[maker])),
                fov_mm=float(rng.uniform(340, 420)),
                slice_thickness_mm=float(rng.choice([1.0, 1.25, 1.5, 1.5, 2.0])),
                scan_length_mm=float(rng.uniform(330, 420)),
                noise_hu=float(rng.uniform(6, 22)),
                phase_weights=tuple(float(w) for w in weights),
                orientation="LPS" if rng.random() < 0.6 else "RAS",
                race_weights=tuple(float(w) for w in race / race.sum()),
            )
        )
    return hospitals


# --------------------------------------------------------------------------------------------------
# Geometry helpers: organs are drawn inside their bounding boxes, on 1-D world axes
# --------------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """A diagonal affine grid (axis flips allowed): world coordinate of index i on axis a is
    ``step[a] * i + origin[a]``."""

    shape: tuple[int, int, int]
    step: np.ndarray  # signed mm per voxel, per axis
    origin: np.ndarray  # world mm of voxel 0

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag(np.append(self.step, 1.0))
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, ...] | None:
        """Index box covering the world box [lo, hi] (clipped), or None when outside."""
        out = []
        for a in range(3):
            i0 = (lo_mm[a] - self.origin[a]) / self.step[a]
            i1 = (hi_mm[a] - self.origin[a]) / self.step[a]
            lo, hi = int(np.floor(min(i0, i1))), int(np.ceil(max(i0, i1))) + 1
            lo, hi = max(lo, 0), min(hi, self.shape[a])
            if lo >= hi:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def axes(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable world coordinates (float32) of a box: shapes (n,1,1), (1,n,1), (1,1,n)."""
        out = []
        for a in range(3):
            v = (np.arange(box[a].start, box[a].stop) * self.step[a] + self.origin[a]).astype(np.float32)
            shape = [1, 1, 1]
            shape[a] = v.size
            out.append(v.reshape(shape))
        return out[0], out[1], out[2]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation of at most about ``max_deg`` degrees around each axis."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Blob:
    """A lobulated ellipsoid: ``(p-c)^T Q (p-c) < (1 + lob(p))^2`` with
    ``Q = R diag(1/r^2) R^T`` and ``lob(p) = sum_k a_k sin(w_xk x + f_xk) sin(w_yk y + f_yk) sin(w_zk z + f_zk)``
    (smooth, separable, amplitude ``sum a_k``), ``p`` in mm."""

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    lob_amp: np.ndarray
    lob_freq: np.ndarray  # (K, 3) rad/mm
    lob_phase: np.ndarray  # (K, 3)

    @classmethod
    def random(cls, rng, center, radii, *, lobulation=0.12, rot_deg=12.0, terms=4) -> _Blob:
        radii = np.asarray(radii, float)
        amps = rng.dirichlet(np.ones(terms)) * lobulation * 1.6  # product of sines rarely reaches 1
        freq = rng.uniform(1.0, 3.5, (terms, 3)) / radii  # 1-3.5 waves per semi-axis: low frequency
        return cls(np.asarray(center, float), radii, _rotation(rng, rot_deg), amps, freq, rng.uniform(0, 2 * np.pi, (terms, 3)))

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.abs(self.rotation) @ self.radii * (1 + self.lob_amp.sum())
        return self.center - half, self.center + half

    def inside(self, grid: _Grid) -> tuple[tuple[slice, ...], np.ndarray] | None:
        lo, hi = self.extent()
        box = grid.box(lo, hi)
        if box is None:
            return None
        x, y, z = grid.axes(box)
        d = (x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2]))
        q = (self.rotation @ np.diag(1 / self.radii**2) @ self.rotation.T).astype(np.float32)
        rho = q[0, 0] * d[0] ** 2 + q[1, 1] * d[1] ** 2 + q[2, 2] * d[2] ** 2
        rho = rho + 2 * q[0, 1] * (d[0] * d[1]) + 2 * q[0, 2] * (d[0] * d[2]) + 2 * q[1, 2] * (d[1] * d[2])
        lob = np.float32(1.0)
        for a, w, f in zip(self.lob_amp, self.lob_freq, self.lob_phase):
            sx = np.sin(w[0] * d[0] + f[0]).astype(np.float32)
            sy = np.sin(w[1] * d[1] + f[1]).astype(np.float32)
            sz = np.sin(w[2] * d[2] + f[2]).astype(np.float32)
            lob = lob + np.float32(a) * (sx * sy) * sz
        return box, rho < lob * lob


def _tube(grid: _Grid, z_top: float, z_bottom: float, cx: Callable, cy: Callable, rx: Callable, ry: Callable):
    """An elliptic tube along z: ``((x-cx(z))/rx(z))^2 + ((y-cy(z))/ry(z))^2 < 1`` for z in [bottom, top]."""
    z_ends = grid.origin[2] + grid.step[2] * np.array([0, grid.shape[2] - 1])
    z_bottom, z_top = max(z_bottom, float(z_ends.min())), min(z_top, float(z_ends.max()))  # only the scanned part
    if z_bottom > z_top:
        return None
    zs = np.linspace(z_bottom, z_top, 64)
    pad = 2 * max(float(np.max(rx(zs))), float(np.max(ry(zs))))
    lo = np.array([np.min(cx(zs)) - pad, np.min(cy(zs)) - pad, z_bottom])
    hi = np.array([np.max(cx(zs)) + pad, np.max(cy(zs)) + pad, z_top])
    box = grid.box(lo, hi)
    if box is None:
        return None
    x, y, z = grid.axes(box)
    inside = ((x - cx(z)) / rx(z)) ** 2 + ((y - cy(z)) / ry(z)) ** 2 < 1
    return box, inside & (z >= z_bottom) & (z <= z_top)


def _paint(volume: np.ndarray, found, value: int, *, only_where: int | None = 0) -> None:
    """Set ``volume[box][inside] = value`` where the volume holds ``only_where`` (None: anywhere)."""
    if found is None:
        return
    box, inside = found
    sub = volume[box]
    inside = np.broadcast_to(inside, sub.shape)
    if only_where is not None:
        inside = inside & (sub == only_where)
    np.copyto(sub, np.asarray(value, dtype=volume.dtype), where=inside)


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------

_T_AIR, _T_FAT, _T_MUSCLE, _T_BONE, _T_CSF, _T_LUNG, _T_LESION = 0, 1, 2, 3, 4, 5, 6
_T_ORGAN0 = 10  # tissue code of organ id k is 10 + k


def _case_grid(rng: np.random.Generator, hospital: Hospital, size: str) -> _Grid:
    nx, ny, nz_nominal = SIZES[size]
    sxy = hospital.fov_mm / nx
    length = hospital.scan_length_mm + rng.uniform(-20, 20)
    if size == "full":  # the hospital's real slice thickness: slice count follows the scan length
        nz = max(8, int(round(length / hospital.slice_thickness_mm)))
    else:  # about the nominal count, fewer for thick-slice hospitals
        nz = max(8, int(round(nz_nominal * (1.5 / hospital.slice_thickness_mm) ** 0.5 * length / 375)))
    sz = length / nz
    step = np.array([sxy, sxy, sz]) * (np.array([-1, -1, 1]) if hospital.orientation == "LPS" else 1)
    # centre the volume on the abdomen: x on the spine, y a little anterior, z spanning liver dome to pelvis
    centre = np.array([rng.uniform(-8, 8), rng.uniform(-5, 15), 25 + rng.uniform(-15, 15)])
    origin = centre - step * (np.array([nx, ny, nz]) - 1) / 2
    return _Grid((nx, ny, nz), step, origin)


def _draw_metadata(rng: np.random.Generator, hospital: Hospital) -> dict[str, object]:
    diagnoses = list(DIAGNOSES)
    return {
        "hospital": hospital.name,
        "age": int(np.clip(round(rng.normal(60, 14)), 18, 95)),
        "sex": "M" if rng.random() < 0.52 else "F",
        "race": RACES[int(rng.choice(len(RACES), p=hospital.race_weights))],
        "manufacturer": hospital.manufacturer,
        "scanner": hospital.scanner,
        "contrast_phase": PHASES[int(rng.choice(len(PHASES), p=hospital.phase_weights))],
        "diagnosis": diagnoses[int(rng.choice(len(diagnoses), p=list(DIAGNOSES.values())))],
    }


def make_case(
    case_id: str, hospital: Hospital, *, size: Size = "tiny", rng: np.random.Generator, lesions: bool = False
) -> PhantomCase:
    """Generate one phantom case (see the module docstring for the anatomy); ``lesions``: insert
    tumours with labels of their own (a tumour phantom, see the module docstring)."""
    if size not in SIZES:
        raise ValueError(f"unknown phantom size {size!r}; use one of {list(SIZES)}")
    meta = _draw_metadata(rng, hospital)
    grid = _case_grid(rng, hospital, size)
    diagnosis = str(meta["diagnosis"])
    s = float(np.clip(rng.normal(1.04 if meta["sex"] == "M" else 0.96, 0.05), 0.85, 1.18))  # patient scale

    def jit(c, mm=6.0):
        return (np.asarray(c, float) + rng.normal(0, mm, 3)) * s

    def rad(r, sd=0.08):
        return np.asarray(r, float) * s * np.clip(rng.normal(1, sd, 3), 0.8, 1.2)

    labels = np.zeros(grid.shape[::-1], np.uint8).T  # Fortran order: fast NIfTI writing
    tissue = np.zeros(grid.shape[::-1], np.uint8).T

    # --- body, fat, abdominal wall muscle, lungs, spine (tissue only) --------------------------
    body_a, body_b = 160 * s * rng.uniform(0.92, 1.08), 115 * s * rng.uniform(0.9, 1.1)
    full = tuple(slice(0, n) for n in grid.shape)
    x, y, z = grid.axes(full)
    e_body = (x[:, :, 0] / body_a) ** 2 + ((y[:, :, 0] - 10 * s) / body_b) ** 2  # 2-D; the z taper scales it
    zf2 = ((1 + 0.06 * np.sin((z[0, 0] - 30) / 120)) ** 2).astype(np.float32)  # body a bit wider mid-abdomen
    wall_in, wall_out = ((body_a - 18 * s) / body_a) ** 2, ((body_a - 8 * s) / body_a) ** 2
    # work on the transposed (z, y, x) views, C-contiguous like the temporaries numpy makes
    e_t, z_t, tissue_t = e_body.T[None, :, :], zf2[:, None, None], tissue.T
    np.copyto(tissue_t, np.uint8(_T_FAT), where=e_t < z_t)
    np.copyto(tissue_t, np.uint8(_T_MUSCLE), where=(e_t > wall_in * z_t) & (e_t < wall_out * z_t))
    lung_z0 = 120 * s + rng.normal(0, 8)
    for side in (+1, -1):
        _paint(tissue, _Blob.random(rng, [side * 85 * s, -20 * s, lung_z0 + 90 * s], rad([55, 70, 95]), lobulation=0.05).inside(grid), _T_LUNG, only_where=None)
    spine_c = np.array([0.0, -70 * s])
    r_vb = 18 * s
    _paint(tissue, _tube(grid, 1e4, -1e4, lambda z: spine_c[0], lambda z: spine_c[1], lambda z: r_vb, lambda z: r_vb * 0.9), _T_BONE, only_where=None)
    _paint(tissue, _tube(grid, 1e4, -1e4, lambda z: spine_c[0], lambda z: spine_c[1] - 30 * s, lambda z: 7 * s, lambda z: 7 * s), _T_CSF, only_where=None)
    for side in (+1, -1):  # psoas muscles beside the lower spine
        _paint(tissue, _tube(grid, -20 * s, -1e4, lambda z, side=side: side * (25 + (-z) * 0.15) * s, lambda z: spine_c[1] + 5 * s, lambda z: 14 * s, lambda z: 16 * s), _T_MUSCLE, only_where=None)

    # --- organs -----------------------------------------------------------------------------
    found: dict[str, list] = {o: [] for o in ORGANS}
    ao_x, ao_y, ao_r = -15 * s + rng.normal(0, 3), -38 * s + rng.normal(0, 3), 11 * s * rng.uniform(0.85, 1.15)
    ao_bif = -120 * s + rng.normal(0, 10)
    wig = rng.uniform(0, 2 * np.pi, 2)
    found["aorta"].append(_tube(grid, 1e4, ao_bif, lambda z: ao_x + 3 * np.sin(z / 90 + wig[0]), lambda z: ao_y + 4 * np.sin(z / 110 + wig[1]), lambda z: ao_r * (1 - 0.1 * (z < ao_bif + 40)), lambda z: ao_r))
    cv_x, cv_y = 22 * s + rng.normal(0, 3), -36 * s + rng.normal(0, 3)
    cv_rx, cv_ry = 13 * s * rng.uniform(0.85, 1.15), 9 * s * rng.uniform(0.85, 1.15)
    found["postcava"].append(_tube(grid, 1e4, ao_bif - 10, lambda z: cv_x + 3 * np.sin(z / 80 + wig[1]), lambda z: cv_y + 6 * np.tanh(z / 60), lambda z: cv_rx, lambda z: cv_ry))

    liver_scale = 1.22 if diagnosis == "hepatomegaly" else 1.0
    spleen_scale = 1.45 if diagnosis == "splenomegaly" else 1.0
    liver_c = jit([70, 5, 60])
    found["liver"].append(_Blob.random(rng, liver_c, rad([75, 85, 65]) * liver_scale, lobulation=0.14).inside(grid))
    found["liver"].append(_Blob.random(rng, liver_c + np.array([-85, 30, 10]) * s * liver_scale, rad([45, 35, 32]) * liver_scale, lobulation=0.12).inside(grid))
    spleen_c = jit([-95, -40, 50]) + np.array([-10, 0, 0]) * (spleen_scale - 1) * s
    found["spleen"].append(_Blob.random(rng, spleen_c, rad([25, 45, 50]) * spleen_scale, lobulation=0.1).inside(grid))
    for organ, side, zc in (("kidney_left", -1, -15), ("kidney_right", +1, -30)):
        c = jit([side * 65, -65, zc], 5)
        blob = _Blob.random(rng, c, rad([28, 30, 55]), lobulation=0.06, rot_deg=8)
        found[organ].append(blob.inside(grid))
        found[organ].append(("cut", _Blob.random(rng, c + np.array([-side * 30, 8, 0]) * s, rad([14, 12, 20]), lobulation=0.0).inside(grid)))
    # pancreas: a tapered tube across the abdomen, head right (near the duodenum), tail left (splenic hilum)
    px0, px1 = 40 * s + rng.normal(0, 4), -85 * s + rng.normal(0, 4)
    pz, py = 10 * s + rng.normal(0, 5), -5 * s + rng.normal(0, 3)
    found["pancreas"].append(_pancreas(grid, px0, px1, py, pz, s, rng))
    st_c = jit([-55, 40, 55])
    found["stomach"].append(_Blob.random(rng, st_c + np.array([-10, -15, 20]) * s, rad([40, 35, 45]), lobulation=0.12).inside(grid))
    found["stomach"].append(_Blob.random(rng, st_c + np.array([25, 15, -35]) * s, rad([45, 25, 28]), lobulation=0.12, rot_deg=25).inside(grid))
    gb_c = liver_c + np.array([-25, 33, -60]) * s * np.array([1, 1, liver_scale])
    found["gall_bladder"].append(_Blob.random(rng, gb_c, rad([15, 15, 32], 0.12), lobulation=0.08, rot_deg=20).inside(grid))

    body = tissue != _T_AIR
    for organ in PRIORITY:
        label_id = LABEL_IDS[organ]
        cuts = [f[1] for f in found[organ] if isinstance(f, tuple) and len(f) == 2 and f[0] == "cut"]
        for f in found[organ]:
            if f is None or (isinstance(f, tuple) and f[0] == "cut"):
                continue
            box, inside = f
            inside = np.broadcast_to(inside, labels[box].shape) & body[box]
            for cut in cuts:  # concavities (kidney hilum)
                if cut is not None:
                    inside = inside & ~_in_box(cut, box)
            _paint(labels, (box, inside), label_id)

    # --- CT ---------------------------------------------------------------------------------
    phase = str(meta["contrast_phase"])
    lut = np.zeros(256, np.float32)
    for name, code in (("air", _T_AIR), ("fat", _T_FAT), ("muscle", _T_MUSCLE), ("bone", _T_BONE), ("csf", _T_CSF), ("lung", _T_LUNG), ("lesion", _T_LESION)):
        lut[code] = TISSUE_HU[name]
    for organ, label_id in LABEL_IDS.items():
        lut[_T_ORGAN0 + label_id] = ORGAN_HU[organ][phase] + rng.normal(0, 5)
    lesion_counts: dict[str, int] = {}
    if lesions:
        lesion_rng = rng.spawn(1)[0]  # a child stream: the case's own draws below stay the same
        lesion_counts = _add_tumours(lesion_rng, labels, grid)
        for name, label_id in LESION_LABEL_IDS.items():
            lut[_T_ORGAN0 + label_id] = LESION_HU[name][phase] + lesion_rng.normal(0, 5)
    np.copyto(tissue, labels + np.uint8(_T_ORGAN0), where=labels > 0)
    _add_lesion(rng, diagnosis, labels, tissue, grid)
    ct = lut[tissue]
    _add_noise(ct, rng, hospital.noise_hu * rng.uniform(0.85, 1.15))
    np.clip(ct, -1024, 3071, out=ct)
    ct = np.rint(ct, out=ct).astype(np.int16, order="K")
    if not ct.flags.f_contiguous:
        ct = np.asfortranarray(ct)

    meta.update({"size": size, "spacing_mm": "x".join(f"{v:.4g}" for v in np.abs(grid.step)), "shape": "x".join(map(str, grid.shape))})
    meta.update({f"n_{name}": n for name, n in lesion_counts.items()})
    return PhantomCase(case_id=case_id, ct=ct, labels=labels, affine=grid.affine, metadata=meta)


def _in_box(found, box: tuple[slice, ...]) -> np.ndarray:
    """The part of a (box, inside) result that falls inside ``box``, as a bool array of box's shape."""
    cbox, cin = found
    out = np.zeros(tuple(b.stop - b.start for b in box), bool)
    inter = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, cbox)]
    if any(s.start >= s.stop for s in inter):
        return out
    cin = np.broadcast_to(cin, tuple(b.stop - b.start for b in cbox))
    out[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inter, box))] = cin[
        tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(inter, cbox))
    ]
    return out


def _pancreas(grid: _Grid, x_head: float, x_tail: float, y0: float, z0: float, s: float, rng):
    """Tapered tube along x: centre (y(x), z(x)) rising and going posterior toward the tail."""
    lo = np.array([x_tail - 12 * s, y0 - 45 * s, z0 - 30 * s])
    hi = np.array([x_head + 18 * s, y0 + 30 * s, z0 + 45 * s])
    box = grid.box(lo, hi)
    if box is None:
        return None
    x, y, z = grid.axes(box)
    t = np.clip((x_head - x) / (x_head - x_tail), 0, 1)  # 0 at the head, 1 at the tail
    a1, a2 = rng.uniform(0.8, 1.2, 2)
    cy = y0 - 25 * s * t**1.5 * a1 + 4 * s * np.sin(6 * t)
    cz = z0 + 15 * s * t * a2
    r = (15 - 7 * t) * s * rng.uniform(0.9, 1.1)
    rz = r * 0.75
    inside = ((y - cy) / r) ** 2 + ((z - cz) / rz) ** 2 < 1 + 0.15 * np.sin(9 * t + rng.uniform(0, 6)) * np.cos((z - cz) / 6)
    inside &= (x <= x_head + 10 * s) & (x >= x_tail)
    return box, inside


def _add_lesion(rng, diagnosis: str, labels: np.ndarray, tissue: np.ndarray, grid: _Grid) -> None:
    """Hypodense lesions keep their organ label (as in AbdomenAtlas) but change the CT."""
    host = {"liver_lesion": "liver", "renal_cyst": "kidney_left", "pancreatic_tumor": "pancreas", "cholelithiasis": "gall_bladder"}.get(diagnosis)
    if host is None:
        return
    idx = np.argwhere(labels == LABEL_IDS[host])
    if idx.size == 0:
        return
    centre_idx = idx[rng.integers(len(idx))]
    centre = grid.origin + grid.step * centre_idx
    radius = {"liver": 15, "kidney_left": 10, "pancreas": 8, "gall_bladder": 5}[host] * rng.uniform(0.6, 1.2)
    blob = _Blob.random(rng, centre, [radius] * 3, lobulation=0.1)
    found = blob.inside(grid)
    if found is None:
        return
    box, inside = found
    inside = np.broadcast_to(inside, labels[box].shape) & (labels[box] == LABEL_IDS[host])
    code = _T_BONE if host == "gall_bladder" else _T_LESION  # gallstones are dense
    np.copyto(tissue[box], np.uint8(code), where=inside)


def _add_tumours(rng: np.random.Generator, labels: np.ndarray, grid: _Grid) -> dict[str, int]:
    """Insert tumours (module docstring) into ``labels`` in place: each a lobulated ball centred on
    a random voxel of its host organ, written with its lesion class where the host organ is.
    Returns the number of connected lesions (26-connectivity) of each class in the label map."""
    from evaluation.lesions import connected_components

    host_class = {host: name for name, hosts in LESION_HOSTS.items() for host in hosts}
    if rng.random() < NO_LESION_SHARE:
        return {name: 0 for name in LESION_LABEL_IDS}
    counts = {host: int(rng.poisson(mean)) for host, mean in LESIONS_PER_ORGAN.items()}
    if not any(counts.values()):
        counts["liver"] = 1
    lo, hi = np.log(LESION_DIAMETER_MM[0]), np.log(LESION_DIAMETER_MM[1])
    for host, n in counts.items():
        host_id = LABEL_IDS[host]
        box = io._bbox(labels == host_id)
        if box is None or n == 0:
            continue
        idx = np.argwhere(labels[box] == host_id) + np.array([b.start for b in box])
        for _ in range(n):
            centre = grid.origin + grid.step * idx[rng.integers(len(idx))]
            radius = float(np.exp(rng.uniform(lo, hi))) / 2
            found = _Blob.random(rng, centre, radius * rng.uniform(0.85, 1.15, 3), lobulation=0.1).inside(grid)
            if found is None:
                continue
            lbox, inside = found
            inside = np.broadcast_to(inside, labels[lbox].shape) & (labels[lbox] == host_id)
            np.copyto(labels[lbox], np.uint8(LESION_LABEL_IDS[host_class[host]]), where=inside)
    return {name: connected_components(labels == label_id)[1] for name, label_id in LESION_LABEL_IDS.items()}


def _add_noise(ct: np.ndarray, rng: np.random.Generator, sigma: float) -> None:
    """Add N(0, sigma²) HU noise in place. Large volumes reuse a pool of 16 noise slices, each
    slice drawn rolled by a random in-plane offset (drawing 78 M normals costs seconds)."""
    nx, ny, nz = ct.shape
    if ct.size <= 8 * 2**20:
        ct += rng.standard_normal(ct.shape[::-1], dtype=np.float32).T * np.float32(sigma)
        return
    pool = rng.standard_normal((16, ny, nx), dtype=np.float32) * np.float32(sigma)
    shifts = rng.integers(0, [nx, ny], size=(nz, 2))
    picks = rng.integers(0, 16, size=nz)
    for k in range(nz):
        ct[:, :, k] += np.roll(pool[picks[k]], (int(shifts[k, 1]), int(shifts[k, 0])), axis=(0, 1)).T


# --------------------------------------------------------------------------------------------------
# A test set on disk
# --------------------------------------------------------------------------------------------------


def case_rng(seed: int, n_hospitals: int, index: int) -> np.random.Generator:
    """The random stream of case ``index``: independent of how many cases are generated."""
    return np.random.default_rng(np.random.SeedSequence([seed, n_hospitals, index]))


def generate_cases(
    n_cases: int, *, n_hospitals: int = 3, size: Size = "tiny", seed: int = 0, lesions: bool = False
) -> Iterable[PhantomCase]:
    """Yield ``n_cases`` phantom cases ``phantom_00000 ...``, hospitals assigned at random (unequal
    sizes); ``lesions``: tumour phantoms."""
    hospitals = make_hospitals(n_hospitals, seed)
    share = np.random.default_rng(np.random.SeedSequence([seed, n_hospitals, 104729])).dirichlet(np.full(n_hospitals, 3.0))
    for i in range(n_cases):
        rng = case_rng(seed, n_hospitals, i)
        hospital = hospitals[int(rng.choice(n_hospitals, p=share))]
        yield make_case(f"phantom_{i:05d}", hospital, size=size, rng=rng, lesions=lesions)


def write_case(case: PhantomCase, out_dir: Path | str, *, combined: bool = False, lesions: bool = False) -> Path:
    """Write ``<out>/<case_id>/ct.nii.gz``, ``segmentations/<organ>.nii.gz`` (with ``lesions`` also
    ``<lesion class>.nii.gz``) and, with ``combined``, ``combined_labels.nii.gz``."""
    case_dir = Path(out_dir) / case.case_id
    io.write_ct(case_dir, case.ct, case.affine)
    io.write_masks(case_dir, case.labels, case.affine, {**LABEL_IDS, **LESION_LABEL_IDS} if lesions else LABEL_IDS)
    if combined:
        io.write_combined_labels(case_dir, case.labels, case.affine)
    return case_dir


def write_phantom_set(
    out_dir: Path | str,
    n_cases: int,
    *,
    n_hospitals: int = 3,
    size: Size = "tiny",
    seed: int = 0,
    public_sample: int = 0,
    combined: bool = False,
    lesions: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a whole phantom test set and its ``manifest.csv``; return the manifest path.

    ``public_sample``: how many cases (chosen at random, deterministic) are marked public.
    ``lesions``: a tumour test set (score it with the ``touchstone-lesions`` protocol); the
    manifest gets ``n_<lesion class>`` columns.
    """
    from evaluation.manifest import ManifestRow, write_manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pick = np.random.default_rng(np.random.SeedSequence([seed, n_hospitals, 15485863]))
    public = set(pick.choice(n_cases, size=min(public_sample, n_cases), replace=False).tolist()) if n_cases else set()
    rows = []
    for i, case in enumerate(generate_cases(n_cases, n_hospitals=n_hospitals, size=size, seed=seed, lesions=lesions)):
        case_dir = write_case(case, out_dir, combined=combined, lesions=lesions)
        meta = case.metadata
        rows.append(
            ManifestRow(
                case_id=case.case_id,
                image=(case_dir / CT_FILE).relative_to(out_dir).as_posix(),
                labels=(case_dir / (COMBINED_LABELS_FILE if combined else SEGMENTATIONS_DIR)).relative_to(out_dir).as_posix(),
                public_sample=i in public,
                extras={"spacing_mm": str(meta["spacing_mm"]), "shape": str(meta["shape"]),
                        **{f"n_{name}": str(meta[f"n_{name}"]) for name in LESION_LABEL_IDS if lesions}},
                **{k: meta[k] for k in METADATA_FIELDS},
            )
        )
        if progress is not None:
            progress(case.case_id)
    manifest = out_dir / "manifest.csv"
    write_manifest(manifest, rows, checksums=True)
    return manifest


# --------------------------------------------------------------------------------------------------
# Imperfect predictions
# --------------------------------------------------------------------------------------------------

PREDICTION_KINDS = (
    "perfect", "shift", "erode", "dilate", "miss_organ", "false_positive", "wrong_affine", "realistic", "miss_small_lesions",
)


def _shifted(a: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """``a`` moved by ``shift`` voxels, zero-filled (no wrap-around)."""
    out = np.zeros_like(a)
    src, dst = [], []
    for s, n in zip(shift, a.shape):
        s = int(s)
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _morph(labels: np.ndarray, organ_ids: Iterable[int], iterations: int, dilate: bool) -> np.ndarray:
    """Per-organ binary erosion or dilation (6-connectivity, ``iterations`` voxels), in each organ's
    bounding box plus a margin; dilation only grows into background (the result stays a partition)."""
    out = labels.copy()
    for label_id in organ_ids:
        mask = labels == label_id
        box = io._bbox(mask)
        if box is None:
            continue
        m = iterations + 1
        box = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, n in zip(box, labels.shape))
        sub = mask[box]
        if dilate:
            grown = ndimage.binary_dilation(sub, iterations=iterations)
            target = out[box]
            np.copyto(target, np.uint8(label_id), where=grown & (labels[box] == 0) & (target == 0))
        else:
            kept = ndimage.binary_erosion(sub, iterations=iterations, border_value=0)
            target = out[box]
            np.copyto(target, np.uint8(0), where=sub & ~kept)
    return out


def make_prediction(
    labels: np.ndarray,
    affine: np.ndarray,
    kind: str,
    *,
    seed: int = 0,
    organ: str | None = None,
    magnitude: int = 1,
    shift: tuple[int, int, int] | None = None,
    min_lesion_voxels: int = 30,
) -> tuple[np.ndarray, np.ndarray]:
    """An imperfect prediction ``(label_map, affine)`` made from a ground-truth label map.

    ``kind``:

    * ``perfect``: a copy.
    * ``shift``: every organ moved by ``shift`` voxels (default ``magnitude`` voxels along a random axis).
    * ``erode`` / ``dilate``: every organ (or only ``organ``) eroded / dilated by ``magnitude`` voxels.
    * ``miss_organ``: ``organ`` (default: a random present organ) left out.
    * ``false_positive``: ``magnitude`` spherical blobs (radius 3 voxels) of random organ labels in
      the background.
    * ``wrong_affine``: labels unchanged, the affine's origin moved by ``5 * magnitude`` mm (a
      geometry mismatch).
    * ``realistic``: per organ, a random shift of up to 1 voxel and an erosion or dilation of 0-1
      voxel; a small false positive now and then (DSC around 0.8-0.95).
    * ``miss_small_lesions``: a detector that finds the big lesions and misses the small ones:
      every lesion (26-connected component of a lesion class) under ``min_lesion_voxels`` voxels
      becomes its host organ; the others are dilated by one voxel inside their organ.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    affine = np.array(affine, dtype=np.float64)
    ids = [LABEL_IDS[organ]] if organ else [int(v) for v in np.unique(labels) if v]
    if kind == "perfect":
        return labels.copy(), affine
    if kind == "shift":
        if shift is None:
            shift = [0, 0, 0]
            shift[int(rng.integers(3))] = magnitude * (1 if rng.random() < 0.5 else -1)
        return _shifted(labels, tuple(shift)), affine
    if kind in ("erode", "dilate"):
        return _morph(labels, ids, magnitude, kind == "dilate"), affine
    if kind == "miss_organ":
        present = [int(v) for v in np.unique(labels) if v]
        target = LABEL_IDS[organ] if organ else (int(rng.choice(present)) if present else 0)
        return np.where(labels == target, 0, labels).astype(labels.dtype), affine
    if kind == "false_positive":
        out = labels.copy()
        for _ in range(magnitude):
            c = [int(rng.integers(0, n)) for n in labels.shape]
            box = tuple(slice(max(ci - 3, 0), min(ci + 4, n)) for ci, n in zip(c, labels.shape))
            ax = [np.arange(b.start, b.stop) - ci for b, ci in zip(box, c)]
            sphere = ax[0][:, None, None] ** 2 + ax[1][None, :, None] ** 2 + ax[2][None, None, :] ** 2 <= 9
            target = out[box]
            value = LABEL_IDS[organ] if organ else int(rng.integers(1, len(ORGANS) + 1))
            np.copyto(target, np.uint8(value), where=sphere & (target == 0))
        return out, affine
    if kind == "miss_small_lesions":
        from evaluation.lesions import connected_components

        out = labels.copy()
        for name, label_id in LESION_LABEL_IDS.items():
            cc, n = connected_components(labels == label_id)
            if n == 0:
                continue
            sizes = np.bincount(cc.ravel())
            host_ids = [LABEL_IDS[h] for h in LESION_HOSTS[name]]
            small = np.zeros(labels.shape, bool)
            for k in np.flatnonzero(sizes[1:] < min_lesion_voxels) + 1:
                box = io._bbox(cc == k)
                box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
                lesion = cc[box] == k
                ring = labels[box][ndimage.binary_dilation(lesion) & ~lesion]
                # the organ it lies in (of both kidneys: the one around it)
                host = max(host_ids, key=lambda i: int(np.count_nonzero(ring == i)))
                np.copyto(out[box], np.asarray(host, out.dtype), where=lesion)
                small[box] |= lesion
            kept = (labels == label_id) & ~small
            grown = ndimage.binary_dilation(kept) & np.isin(out, [LABEL_IDS[h] for h in LESION_HOSTS[name]])
            np.copyto(out, np.asarray(label_id, out.dtype), where=grown)
        return out, affine
    if kind == "wrong_affine":
        affine[:3, 3] += 5.0 * magnitude
        return labels.copy(), affine
    if kind == "realistic":
        out = np.zeros_like(labels)
        for label_id in ids:
            mask = (labels == label_id).astype(np.uint8)
            mask = _shifted(mask, tuple(int(v) for v in rng.integers(-1, 2, 3)))
            op = rng.integers(3)
            if op:
                mask = _morph(mask, [1], 1, dilate=op == 2)
            np.copyto(out, np.uint8(label_id), where=(mask > 0) & (out == 0))
        if rng.random() < 0.5:
            out, _ = make_prediction(out, affine, "false_positive", seed=seed + 1)
        return out, affine
    raise ValueError(f"unknown prediction kind {kind!r}; use one of {list(PREDICTION_KINDS)}")


def _as_label_map(case: io.CaseLabels, labels: dict[str, int] = LABEL_IDS) -> np.ndarray:
    if case.label_map is not None:
        return np.array(case.label_map, dtype=np.uint8)
    out = np.zeros(case.geometry.shape, np.uint8)
    lesion_classes = [name for name in labels if name in LESION_LABEL_IDS]
    for organ in (*lesion_classes, *PRIORITY):  # overlapping masks: lesions, then vessels win, as in the phantoms
        if case.masks and organ in case.masks:
            np.copyto(out, np.uint8(labels[organ]), where=case.masks[organ] & (out == 0))
    return out


def write_predictions(
    gt_dir: Path | str,
    out_dir: Path | str,
    kind: str = "perfect",
    *,
    layout: io.Layout = "masks",
    seed: int = 0,
    missing_cases: int = 0,
    lesions: bool = False,
    progress: Callable[[str], None] | None = None,
    **kind_options,
) -> dict[str, list[str]]:
    """Write a prediction folder for a whole test set: ``<out>/<case>/segmentations/*.nii.gz``
    (``layout='masks'``) or ``<out>/<case>/combined_labels.nii.gz`` (``'combined'``), each made by
    :func:`make_prediction` from the case's ground truth in ``gt_dir``. ``missing_cases`` cases
    (chosen at random) get no folder. ``lesions``: the label table includes the lesion classes
    (a tumour test set). Returns ``{"written": [...], "missing": [...]}``."""
    if layout not in ("masks", "combined"):
        raise ValueError(f"unknown layout {layout!r}; use 'masks' or 'combined'")
    gt_dir, out_dir = Path(gt_dir), Path(out_dir)
    cases = sorted(p.name for p in gt_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and io.detect_layout(p))
    rng = np.random.default_rng(seed)
    missing = set(rng.choice(cases, size=min(missing_cases, len(cases)), replace=False).tolist()) if missing_cases else set()
    written = []
    for i, case_id in enumerate(cases):
        if case_id in missing:
            continue
        table = {**LABEL_IDS, **LESION_LABEL_IDS} if lesions else LABEL_IDS
        gt = io.read_labels(gt_dir / case_id, table, untrusted=False)
        labels, affine = make_prediction(_as_label_map(gt, table), gt.geometry.affine, kind, seed=seed * 100003 + i, **kind_options)
        labels = np.asfortranarray(labels)
        if layout == "masks":
            io.write_masks(out_dir / case_id, labels, affine, table)
        else:
            io.write_combined_labels(out_dir / case_id, labels, affine)
        written.append(case_id)
        if progress is not None:
            progress(case_id)
    return {"written": written, "missing": sorted(missing)}


__all__ = [
    "Hospital",
    "PhantomCase",
    "PREDICTION_KINDS",
    "SIZES",
    "generate_cases",
    "make_case",
    "make_hospitals",
    "make_prediction",
    "write_case",
    "write_phantom_set",
    "write_predictions",
]
