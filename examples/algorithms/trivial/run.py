"""Trivial example: a threshold segmenter, fast, for pipeline benchmarks (scores are poor).

Every voxel in the soft-tissue window 30..90 HU becomes liver (label 5), every voxel above 150 HU
in the middle of the body becomes aorta (label 1). Writes combined_labels.nii.gz per case.
"""
import json
import os

import nibabel as nib
import numpy as np

for case in json.load(open("/input/cases.json"))["cases"]:
    ct = nib.load(case["ct"])
    hu = np.asanyarray(ct.dataobj)
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu >= 30) & (hu <= 90)] = 5
    labels[hu > 150] = 1
    folder = f"/output/{case['case_id']}"
    os.makedirs(folder, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
    print(f"{case['case_id']}: done", flush=True)
