"""Lesion detector: finds liver lesions that are holes in the liver's HU, misses the others.

No learning; for tumour test sets (``touchstone phantoms --lesions``, protocol
``touchstone-lesions``). For each case:

1. World coordinates (RAS+, mm) from the NIfTI affine; a 3×3×3 mean filter of the HU.
2. The spine (largest component of HU > 400) gives the patient's scale ``s = -y_spine / 70``.
3. Liver: the soft tissue inside an ellipsoid prior of the right lobe whose HU lies within 3.5
   robust standard deviations of the median HU of the prior's core; its largest 6-connected
   component, closed (~12 mm) and holes filled, is the liver *with* its lesions.
4. Lesions: voxels of the filled liver at least 2 voxels inside its edge whose HU differs from
   the liver's median by more than 2.5 robust standard deviations (at least 20 HU), in
   26-connected components of at least ``MIN_LESION_MM3`` (500 mm³, a ball of ~1 cm): they
   become ``liver_lesion`` (10), the rest of the filled liver ``liver`` (5).

So it finds large lesions that contrast with the liver in the scan's phase and lie inside it, and
misses small ones, ones at the liver's edge, ones nearly iso-dense in that phase (e.g. the delayed
phase), and every kidney or pancreatic lesion: its detection (sensitivity, F1) differs from its
overlap on what it finds (case-level and per-lesion DSC). It writes no other organ.

Reads /input/cases.json, writes /output/<case_id>/combined_labels.nii.gz on the CT's grid.
"""

from __future__ import annotations

import json
import os
import sys
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

LIVER, LIVER_LESION = 5, 10
MIN_LESION_MM3 = 500.0


# world_axes and largest_component deliberately repeat examples/algorithms/classical/run.py: each example
# is copied alone into its own image (its folder is the whole build context), so it cannot import another.
def world_axes(affine: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """x, y, z world coordinates (mm, float32), broadcast from 1-D index axes through the affine."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
    a = affine.astype(np.float32)
    return [a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3)]


def largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def segment(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label map: 5 liver, 10 liver lesion, 0 elsewhere."""
    hu = ndimage.uniform_filter(hu.astype(np.float32), size=3)  # 3×3×3 mean: noise σ / 5
    labels = np.zeros(hu.shape, np.uint8)
    bone = hu > 400
    if not bone.any():
        return labels
    x, y, z = world_axes(affine, hu.shape)
    spine = largest_component(bone)
    xs, ys = np.broadcast_to(x, hu.shape)[spine], np.broadcast_to(y, hu.shape)[spine]
    dx, s = float(np.median(xs)), float(np.clip(-float(np.median(ys)) / 70.0, 0.8, 1.25))
    d = np.sqrt(((x - dx - 70 * s) / (75 * s)) ** 2 + ((y - 5 * s) / (85 * s)) ** 2 + ((z - 60 * s) / (65 * s)) ** 2)
    soft = (hu > -40) & (hu < 400)
    core = soft & (d < 0.6)
    if core.sum() < 5:
        return labels
    values = hu[core]
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre))) + 5.0
    tissue = soft & (d < 1.3) & (np.abs(hu - centre) < 3.5 * spread)
    tissue = largest_component(tissue)
    # the liver with its lesions: lesions open to the outside are no holes, so close first
    # (about 12 mm, in voxels of the finest axis), then fill
    steps = max(1, int(round(12.0 / float(np.min(np.abs(np.linalg.svd(affine[:3, :3])[1]))))))
    liver = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=steps)) & soft
    inner = ndimage.binary_erosion(liver, iterations=2)
    # lesion: a voxel inside the liver whose HU differs from the liver's by over 2.5 robust sigma
    # (at least 20 HU): the liver's tolerance above (3.5 sigma) keeps most lesions inside the liver
    off = np.abs(hu - centre) > max(2.5 * (spread - 5.0), 20.0)
    candidates, n = ndimage.label(off & inner, structure=np.ones((3, 3, 3), bool))
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    labels[liver] = LIVER
    if n:
        sizes = np.bincount(candidates.ravel()) * voxel_mm3
        keep = np.flatnonzero(sizes >= MIN_LESION_MM3)
        keep = keep[keep > 0]
        found = np.isin(candidates, keep)
        # a detected lesion's own rim of non-liver voxels belongs to it too
        found = ndimage.binary_dilation(found) & liver & off
        labels[found] = LIVER_LESION
    return labels


def main() -> None:
    cases = json.load(open("/input/cases.json"))["cases"]
    for case in cases:
        started = time.monotonic()
        ct = nib.load(case["ct"])
        labels = segment(np.asanyarray(ct.dataobj), ct.affine)
        folder = f"/output/{case['case_id']}"
        os.makedirs(folder, exist_ok=True)
        nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
        _, n = ndimage.label(labels == LIVER_LESION, structure=np.ones((3, 3, 3), bool))
        print(f"{case['case_id']}: {n} liver lesion(s) in {time.monotonic() - started:.2f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
