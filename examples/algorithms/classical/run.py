"""Classical segmenter: HU windows, anatomical priors in world coordinates, connected components.

No learning. For each case:

1. World coordinates (RAS+, mm) of every voxel from the NIfTI affine, so any stored orientation works.
2. Body = largest component of HU > -500; soft tissue = body voxels with -40 < HU < 400 after a
   3×3×3 median filter (fat is about -100 HU, bone about 700).
3. The spine (largest component of HU > 400) gives the patient's scale: its axis lies at
   y = -70·s mm, so s = -y_spine / 70; every prior below is multiplied by s.
4. Priors: each organ is an ellipsoid, a tube or (pancreas) a tapered tube at its usual place in
   the abdomen; ``d_organ(p)`` is the normalised distance of a voxel to the prior's centre line
   or centre (1 on the prior's surface).
5. Each organ's HU is estimated as the median of the soft tissue in the core of its prior
   (d < 0.6); a voxel is a candidate for an organ when d < 1.3 and its HU is within 3.5 robust
   standard deviations of that median. Among candidates the organ with the smallest d wins.
6. Per organ, the largest 6-connected component is kept and its holes filled.

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

LABELS = {"aorta": 1, "gall_bladder": 2, "kidney_left": 3, "kidney_right": 4, "liver": 5,
          "pancreas": 6, "postcava": 7, "spleen": 8, "stomach": 9}


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


def ellipsoid(x, y, z, centre, radii):
    return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2)


def priors(x, y, z, s: float, spine_xy: tuple[float, float]) -> dict[str, np.ndarray]:
    """Normalised distance to each organ's prior (1 = its surface), patient scale ``s``."""
    dx = spine_xy[0]  # the patient may lie off-centre in x
    X = x - dx
    inf = np.float32(np.inf)
    d = {}
    above_bif = z > -120 * s
    d["aorta"] = np.where(above_bif, np.sqrt(((X + 15 * s) / (11 * s)) ** 2 + ((y + 38 * s) / (11 * s)) ** 2 + 0 * z), inf)
    d["postcava"] = np.where(z > -130 * s, np.sqrt(((X - 22 * s) / (13 * s)) ** 2 + ((y + 36 * s) / (9 * s)) ** 2 + 0 * z), inf)
    d["kidney_left"] = ellipsoid(X, y, z, (-65 * s, -65 * s, -15 * s), (28 * s, 30 * s, 55 * s))
    d["kidney_right"] = ellipsoid(X, y, z, (65 * s, -65 * s, -30 * s), (28 * s, 30 * s, 55 * s))
    d["spleen"] = ellipsoid(X, y, z, (-95 * s, -40 * s, 50 * s), (25 * s, 45 * s, 50 * s))
    # pancreas: tapered tube along x from the head (x = 40 s) to the tail (x = -85 s)
    t = np.clip((40 * s - X) / (125 * s), 0, 1)
    cy, cz, r = -5 * s - 25 * s * t**1.5, 10 * s + 15 * s * t, (15 - 7 * t) * s
    inside_x = (X <= 50 * s) & (X >= -85 * s)
    d["pancreas"] = np.where(inside_x, np.sqrt(((y - cy) / r) ** 2 + ((z - cz) / (0.75 * r)) ** 2), inf)
    d["gall_bladder"] = ellipsoid(X, y, z, (45 * s, 38 * s, 0), (15 * s, 15 * s, 32 * s))
    d["stomach"] = np.minimum(ellipsoid(X, y, z, (-65 * s, 25 * s, 75 * s), (40 * s, 35 * s, 45 * s)),
                              ellipsoid(X, y, z, (-30 * s, 55 * s, 20 * s), (45 * s, 25 * s, 28 * s)))
    d["liver"] = np.minimum(ellipsoid(X, y, z, (70 * s, 5 * s, 60 * s), (75 * s, 85 * s, 65 * s)),
                            ellipsoid(X, y, z, (-15 * s, 35 * s, 70 * s), (45 * s, 35 * s, 32 * s)))
    return {organ: np.broadcast_to(v, np.broadcast_shapes(x.shape, y.shape, z.shape)).astype(np.float32) for organ, v in d.items()}


def segment(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    hu = ndimage.median_filter(hu.astype(np.float32), size=3)
    x, y, z = world_axes(affine, hu.shape)
    body = largest_component(hu > -500)
    soft = body & (hu > -40) & (hu < 400)
    bone = hu > 400
    labels = np.zeros(hu.shape, np.uint8)
    if not bone.any():
        return labels
    spine = largest_component(bone)
    xs, ys = np.broadcast_to(x, hu.shape)[spine], np.broadcast_to(y, hu.shape)[spine]
    spine_xy = (float(np.median(xs)), float(np.median(ys)))
    s = float(np.clip(-spine_xy[1] / 70.0, 0.8, 1.25))
    dist = priors(x, y, z, s, spine_xy)

    best = np.full(hu.shape, np.inf, np.float32)
    for organ, d in dist.items():
        core = soft & (d < 0.6)
        if core.sum() < 5:
            continue
        values = hu[core]
        centre = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - centre))) + 5.0  # robust sigma, at least 5 HU
        candidate = soft & (d < 1.3) & (np.abs(hu - centre) < 3.5 * spread) & (d < best)
        labels[candidate] = LABELS[organ]
        best[candidate] = d[candidate]

    cleaned = np.zeros_like(labels)
    for organ, label_id in LABELS.items():
        mask = labels == label_id
        if mask.any():
            mask = ndimage.binary_fill_holes(largest_component(mask))
            cleaned[mask & (cleaned == 0)] = label_id
    return cleaned


def main() -> None:
    cases = json.load(open("/input/cases.json"))["cases"]
    for case in cases:
        started = time.monotonic()
        ct = nib.load(case["ct"])
        labels = segment(np.asanyarray(ct.dataobj), ct.affine)
        folder = f"/output/{case['case_id']}"
        os.makedirs(folder, exist_ok=True)
        nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
        print(f"{case['case_id']}: {int((labels > 0).sum())} organ voxels in {time.monotonic() - started:.2f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
