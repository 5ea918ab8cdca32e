"""Private geometry kernels for :mod:`evaluation.metrics`: bounding boxes, crops, surfaces, nearest points.

Everything here works on one organ at a time, on a *padded crop*: the union bounding box of the
prediction and the ground truth, grown by one zero voxel on every side. Because the one-voxel
ring is zero whether it lies inside the volume or outside it, an object touching the volume border
is handled exactly as both oracles handle it (DeepMind pads with zeros before its 2x2x2
correlation; MONAI crops with ``margin=1`` and pads out-of-volume voxels with zeros, and scipy's
erosion treats the outside as background).

Coordinates are integer indices into the padded crop; distances are computed from integer offsets
``Δ`` with the oracle's own floating-point formula, so that comparisons such as ``d <= τ`` take the
same branch as in the oracle:

* surfel (DeepMind, scipy ``distance_transform_edt``): ``d = sqrt(((Δ0·s0)² + (Δ1·s1)²) + (Δ2·s2)²)``
  in float64;
* voxel (MONAI on CPU, scipy ``KDTree``): ``d = float32(‖x·s − y·s‖₂)`` where ``x, y`` are crop
  indices, i.e. the KD-tree distance in float64 rounded to float32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree

#: (start, stop) per axis, stop exclusive
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------------------------
# bounding boxes
# --------------------------------------------------------------------------------------------
def _nonzero_range(flags: np.ndarray) -> tuple[int, int] | None:
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return None
    return int(idx[0]), int(idx[-1]) + 1


def bounding_box(mask: np.ndarray) -> Box | None:
    """Bounding box of the non-zero voxels of a 3-D boolean mask, or ``None`` if it is empty.

    One pass over the volume along its slowest-varying memory axis (a byte-wise ``max`` over each
    slab, which numpy vectorises), then the other two axes on the occupied slab only. Works for
    C- and Fortran-ordered arrays without copying them.
    """
    if mask.dtype != np.bool_:
        raise TypeError(f"bounding_box needs a boolean mask, got {mask.dtype}")
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        box_t = bounding_box(mask.T)  # a C-ordered view of the same memory
        return None if box_t is None else (box_t[2], box_t[1], box_t[0])
    strides = [abs(s) for s in mask.strides]
    outer = int(np.argmax(strides))
    view = np.moveaxis(mask, outer, 0)  # a view; for a C-ordered mask each slab is contiguous
    if view.flags.c_contiguous:
        # one any() over each contiguous slab: the fastest full pass numpy offers (memory bound)
        slab_flags = view.reshape(view.shape[0], -1).any(axis=1)
    else:
        slab_flags = view.any(axis=(1, 2))
    r0 = _nonzero_range(slab_flags)
    if r0 is None:
        return None
    plane = view[r0[0] : r0[1]].any(axis=0)  # the two remaining axes, in moveaxis order
    r1 = _nonzero_range(plane.any(axis=1))
    r2 = _nonzero_range(plane.any(axis=0))
    assert r1 is not None and r2 is not None
    others = [a for a in range(3) if a != outer]
    box: list[tuple[int, int]] = [(0, 0)] * 3
    box[outer], box[others[0]], box[others[1]] = r0, r1, r2
    return (box[0], box[1], box[2])


def union_box(a: Box | None, b: Box | None) -> Box | None:
    """Smallest box containing both boxes (``None`` stands for an empty mask)."""
    if a is None:
        return b
    if b is None:
        return a
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))  # type: ignore[return-value]


def label_boxes(label_map: np.ndarray, labels: list[int]) -> dict[int, Box | None]:
    """Bounding box of each label of an integer label map, in one pass (``scipy.ndimage.find_objects``)."""
    from scipy import ndimage

    wanted = [lab for lab in labels if lab > 0]
    if not wanted:
        return {lab: None for lab in labels}
    max_label = max(wanted)
    lm = label_map
    if lm.dtype.kind not in "iu":
        raise TypeError(f"a label map must have an integer dtype, got {lm.dtype}")
    if lm.dtype.kind == "i" or lm.dtype.itemsize > 4:
        # find_objects ignores values <= 0 and needs a type it supports; int64/uint64 maps and
        # negative values are rare, so a copy is acceptable there.
        if lm.dtype.itemsize > 4 or lm.dtype.kind == "i":
            lm = np.where((lm > 0) & (lm <= max_label), lm, 0).astype(np.int32)
    if lm.flags.f_contiguous and not lm.flags.c_contiguous:
        # find_objects walks memory in C order: on a Fortran array use its C-ordered transpose
        objects = [None if sl is None else sl[::-1] for sl in ndimage.find_objects(lm.T, max_label=max_label)]
    else:
        objects = ndimage.find_objects(lm, max_label=max_label)
    out: dict[int, Box | None] = {}
    for lab in labels:
        sl = objects[lab - 1] if 0 < lab <= len(objects) else None
        out[lab] = None if sl is None else tuple((s.start, s.stop) for s in sl)  # type: ignore[assignment]
    return out


def padded_crop(source: np.ndarray, box: Box, label: int | None = None, margin: int = 1) -> np.ndarray:
    """Copy ``source[box]`` (as a mask: ``== label`` for a label map) into a zero array ``margin`` voxels larger on every side.

    The result is C-ordered ``uint8`` with values 0/1 and shape ``box extent + 2·margin``.
    """
    (x0, x1), (y0, y1), (z0, z1) = box
    m = int(margin)
    out = np.zeros((x1 - x0 + 2 * m, y1 - y0 + 2 * m, z1 - z0 + 2 * m), dtype=np.uint8)
    inner = out[m:-m, m:-m, m:-m]
    part = source[x0:x1, y0:y1, z0:z1]
    if label is None:
        inner[...] = part
    else:
        np.equal(part, label, out=inner.view(np.bool_))
    return out


# --------------------------------------------------------------------------------------------
# surfaces
# --------------------------------------------------------------------------------------------
def voxel_edges(padded: np.ndarray) -> np.ndarray:
    """Integer coordinates of :func:`voxel_edge_grid` (``(n, 3)`` int64, padded-crop indices)."""
    return np.argwhere(voxel_edge_grid(padded))


def voxel_edge_grid(padded: np.ndarray) -> np.ndarray:
    """MONAI's default boundary: foreground voxels with a background 6-neighbour.

    ``edges = seg ^ binary_erosion(seg)`` with scipy's default cross-shaped structuring element and
    background outside the volume, evaluated on a zero-padded crop (``padded``, 0/1 ``uint8``).
    Returns a boolean grid of the padded crop's shape, ``True`` on edge voxels (padded-crop
    indices are MONAI's crop coordinates: its crop starts one voxel before the bounding box).
    """
    p = padded.view(np.bool_)
    c = p[1:-1, 1:-1, 1:-1]
    interior = c & p[:-2, 1:-1, 1:-1]
    interior &= p[2:, 1:-1, 1:-1]
    interior &= p[1:-1, :-2, 1:-1]
    interior &= p[1:-1, 2:, 1:-1]
    interior &= p[1:-1, 1:-1, :-2]
    interior &= p[1:-1, 1:-1, 2:]
    grid = np.zeros(padded.shape, dtype=bool)
    np.greater(c, interior, out=grid[1:-1, 1:-1, 1:-1])  # c & ~interior
    return grid


def neighbour_codes(padded: np.ndarray, reversed_axes: bool = False) -> np.ndarray:
    """DeepMind's 8-bit neighbour code of every voxel corner of the padded crop.

    For corner ``(i, j, k)`` (between voxels ``i-1`` and ``i`` of the unpadded crop on each axis)
    ``code = Σ_{a,b,c∈{0,1}} 2^(7-4a-2b-c) · m[i+a, j+b, k+c]`` over the padded mask ``m`` — the same
    value ``scipy.ndimage.correlate(mask, ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant")`` gives
    in ``surface_distance.compute_surface_distances``, computed separably in three passes
    (offset 0 along axis 0, 1, 2 multiplies by 16, 4, 2). ``reversed_axes``: ``padded`` is the
    transpose of the mask (a Fortran-ordered input seen in memory order); the codes are still
    those of the untransposed mask.
    """
    m = padded
    f0, f1, f2 = (2, 4, 16) if reversed_axes else (16, 4, 2)
    t = m[:, :, :-1] * np.uint8(f2)
    t += m[:, :, 1:]
    u = t[:, :-1, :] * np.uint8(f1)
    u += t[:, 1:, :]
    code = u[:-1] * np.uint8(f0)
    code += u[1:]
    return code


@lru_cache(maxsize=64)
def surfel_area_table(spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Area in mm² of the marching-cubes surface of each of the 256 neighbour codes (DeepMind's table)."""
    from surface_distance.lookup_tables import create_table_neighbour_code_to_surface_area

    table = np.asarray(create_table_neighbour_code_to_surface_area(spacing_mm), dtype=np.float64)
    table.setflags(write=False)
    return table


def surfels(
    padded: np.ndarray, spacing_mm: tuple[float, float, float], reversed_axes: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Surface elements of a padded crop: corner coordinates ``(n, 3)``, their areas (mm²) and the border grid.

    A corner carries a surfel when its 2x2x2 neighbourhood is neither all background (code 0) nor
    all foreground (code 255). The grid is boolean over all corners, ``True`` on surfels.
    Coordinates are in the axis order of the grid (reverse them for ``reversed_axes``).
    """
    code = neighbour_codes(padded, reversed_axes)
    border = code != 0
    border &= code != 255
    coords = np.argwhere(border)
    areas = surfel_area_table(spacing_mm)[code[border]]
    return coords, areas, border


# --------------------------------------------------------------------------------------------
# nearest surface points
# --------------------------------------------------------------------------------------------
#: A nearest-neighbour backend: (query coords, target coords, spacing, upper bound in mm or inf)
#: -> index into target of the nearest target point, or -1 where none is within the bound.
NearestFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def nearest_kdtree(query: np.ndarray, target: np.ndarray, spacing: np.ndarray, bound: float) -> np.ndarray:
    """Nearest target point (index) of every query point under the mm metric, with scipy's KD-tree."""
    tree = cKDTree(target * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
    if np.isfinite(bound):
        _, idx = tree.query(query * spacing, k=1, distance_upper_bound=bound)
    else:
        _, idx = tree.query(query * spacing, k=1)
    idx = np.asarray(idx, dtype=np.int64)
    idx[idx >= len(target)] = -1
    return idx


def edt_distance(delta: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``sqrt(((Δ0·s0)² + (Δ1·s1)²) + (Δ2·s2)²)`` in float64, exactly as scipy's ``distance_transform_edt``."""
    d = delta.astype(np.float64)
    d *= spacing
    d *= d
    return np.sqrt((d[:, 0] + d[:, 1]) + d[:, 2])


def kdtree_distance(query: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``‖q·s − t·s‖₂`` in float64 summed over axes in order, as scipy's KD-tree computes it."""
    d = query * spacing - target * spacing
    d *= d
    return np.sqrt((d[:, 0] + d[:, 1]) + d[:, 2])


# --------------------------------------------------------------------------------------------
# "within τ" without distances: offset lookups (NSD only)
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def ball_offsets(spacing_mm: tuple[float, float, float], radius_mm: float, definition: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets ``o`` within ``radius_mm`` under the oracle's distance formula, nearest first.

    Returns ``(sure, ambiguous)``. Surfel mode: ``sure`` = ``{o : edt_distance(o) <= r}`` exactly
    (the oracle's value depends on ``o`` only), ``ambiguous`` is empty. Voxel mode: the oracle's
    value ``float32(‖x·s − y·s‖)`` also depends on the absolute coordinates by a rounding error, so
    offsets whose float64 length lies within 1e-9 (relative) of the float32 decision boundary are
    returned as ``ambiguous`` and decided per pair.
    """
    s = np.asarray(spacing_mm, dtype=np.float64)
    reach = np.floor(radius_mm * (1 + 1e-6) / s + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    lengths = edt_distance(offsets, s)
    if definition == "surfel":
        keep = lengths <= radius_mm
        sure, amb = offsets[keep], offsets[:0]
        order = np.argsort(lengths[keep], kind="stable")
        return sure[order], amb
    r32 = np.float32(radius_mm)
    as32 = lengths.astype(np.float32)
    # float32 rounding is monotone: values far below/above the boundary cannot change side
    nxt = float(np.nextafter(r32, np.float32(np.inf)))
    boundary = (float(r32) + nxt) / 2.0  # float64 values above this round above r32
    near = np.abs(lengths - boundary) <= 1e-9 * max(boundary, 1.0)
    sure_mask = (as32 <= r32) & ~near
    order = np.argsort(lengths[sure_mask], kind="stable")
    return offsets[sure_mask][order], offsets[near]


def ball_reach(spacing_mm: tuple[float, float, float], radius_mm: float, definition: str) -> int:
    """Largest per-axis voxel offset of :func:`ball_offsets` (how much margin a crop needs)."""
    sure, amb = ball_offsets(spacing_mm, float(radius_mm), definition)
    both = np.concatenate([sure, amb, np.zeros((1, 3), int)])
    return int(np.max(np.abs(both)))


def within_flat(
    query_flat: np.ndarray,
    target_grid: np.ndarray,
    spacing_mm: tuple[float, float, float],
    radius_mm: float,
    definition: str,
    coord_origin: int = 0,
    reversed_axes: bool = False,
) -> np.ndarray:
    """Boolean per query point: is a ``True`` voxel of ``target_grid`` within ``radius_mm`` of it?

    ``query_flat`` holds flat (C-order) indices into ``target_grid`` (the other mask's surface on
    the same grid), every one at least :func:`ball_reach` voxels from the grid's faces. Offsets
    are tried nearest first and resolved points drop out, so points on or next to the other
    surface cost one or two look-ups and only far points try the whole ball. ``coord_origin`` is
    subtracted from grid indices to get the oracle's coordinates (voxel mode, ambiguous offsets).
    ``reversed_axes``: the grid is the transpose of the volume (offsets and spacing stay in the
    volume's axis order; only the memory look-ups are transposed).
    """
    sure, ambiguous = ball_offsets(spacing_mm, float(radius_mm), definition)
    flip = (lambda a: a[:, ::-1]) if reversed_axes else (lambda a: a)
    n = len(query_flat)
    hit = np.zeros(n, dtype=bool)
    if n == 0:
        return hit
    flat = target_grid.reshape(-1)
    shape = target_grid.shape
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    remaining = np.arange(n)
    rem_lin = query_flat
    for off in (flip(sure) @ strides).tolist():
        found = flat[rem_lin + off]
        if found.any():
            keep = ~found
            hit[remaining[found]] = True
            remaining = remaining[keep]
            rem_lin = rem_lin[keep]
            if len(remaining) == 0:
                return hit
    if len(ambiguous) and len(remaining):
        s = np.asarray(spacing_mm, dtype=np.float64)
        r32 = np.float32(radius_mm)
        for o, off in zip(ambiguous, (flip(ambiguous) @ strides).tolist()):
            found = flat[rem_lin + off]
            if found.any():
                q = flip(np.stack(np.unravel_index(rem_lin[found], shape), axis=1)).astype(np.float64) - coord_origin
                d = kdtree_distance(q + o, q, s).astype(np.float32)
                ok = np.zeros(len(remaining), bool)
                ok[np.flatnonzero(found)[d <= r32]] = True
                hit[remaining[ok]] = True
                remaining = remaining[~ok]
                rem_lin = rem_lin[~ok]
                if len(remaining) == 0:
                    break
    return hit
