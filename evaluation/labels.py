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

#: lesion classes of tumour test sets (names as AbdomenAtlas 3.0), after the organs: in a label map
#: a lesion voxel carries its lesion class, not its organ (the classes stay disjoint); the
#: ``touchstone-lesions`` protocol's label table is ``{**LABEL_IDS, **LESION_LABEL_IDS}``
LESION_LABEL_IDS: dict[str, int] = {"liver_lesion": 10, "kidney_lesion": 11, "pancreatic_lesion": 12}
#: organ each lesion class lies in (both kidneys for ``kidney_lesion``)
LESION_HOSTS: dict[str, tuple[str, ...]] = {
    "liver_lesion": ("liver",),
    "kidney_lesion": ("kidney_left", "kidney_right"),
    "pancreatic_lesion": ("pancreas",),
}

#: the per-organ mask file inside a case folder, relative to the case folder
SEGMENTATIONS_DIR = "segmentations"
#: the single label-map file inside a case folder
COMBINED_LABELS_FILE = "combined_labels.nii.gz"
#: the CT inside a case folder (input to algorithms)
CT_FILE = "ct.nii.gz"
