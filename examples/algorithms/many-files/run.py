"""Misbehaving example: writes valid outputs, then 300,000 small files under /output/junk/.

Each file is tiny, so only a limit on the number of files (at any depth) stops it; none of them
may stay in storage.
"""
import json
import os

import nibabel as nib
import numpy as np

# the valid outputs are written as in examples/algorithms/deep-writer/run.py, deliberately: each example
# is the whole build context of its own image and reads alone; only what follows the loop differs.
for case in json.load(open("/input/cases.json"))["cases"]:
    ct = nib.load(case["ct"])
    labels = np.zeros(ct.shape, np.uint8)
    labels[np.asanyarray(ct.dataobj) > 150] = 1
    folder = f"/output/{case['case_id']}"
    os.makedirs(folder, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
print("valid outputs written; now writing 300000 files", flush=True)
for i in range(300_000):
    folder = f"/output/junk/{i // 1000:03d}"
    if i % 1000 == 0:
        os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/{i:06d}.txt", "wb") as handle:
        handle.write(b"x")
print("wrote 300000 files", flush=True)
