"""The label set of the Touchstone / AbdomenAtlas layout (docs/container-contract.md).

A combined label map stores organ ``k`` as voxel value ``LABEL_IDS[organ] == k``; the per-organ
layout stores one binary mask per organ as ``segmentations/<organ>.nii.gz``.
"""

from __future__ import annotations

ORGANS: tuple[str, ...] = (
    "aorta",
    "gall_bladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "postcava",
    "spleen",
    "stomach",
)

#: organ name -> voxel value in ``combined_labels.nii.gz`` (0 is background)
LABEL_IDS: dict[str, int] = {organ: i + 1 for i, organ in enumerate(ORGANS)}

#: voxel value -> organ name
ORGAN_BY_ID: dict[int, str] = {i: organ for organ, i in LABEL_IDS.items()}

#: the per-organ mask file inside a case folder, relative to the case folder
SEGMENTATIONS_DIR = "segmentations"
#: the single label-map file inside a case folder
COMBINED_LABELS_FILE = "combined_labels.nii.gz"
#: the CT inside a case folder (input to algorithms)
CT_FILE = "ct.nii.gz"
