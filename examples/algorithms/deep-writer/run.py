"""Misbehaving example: writes valid outputs, then fills /output/x/y/z/ with up to 3 GiB.

The valid part is the trivial segmenter's; the rest is outside the container contract and deeper
than the contract's folders, so a size watcher that looks only two folders deep misses it. The
output limits must stop the run at the cap, and none of these bytes may stay in storage.
"""
import json
import os

import nibabel as nib
import numpy as np

for case in json.load(open("/input/cases.json"))["cases"]:
    ct = nib.load(case["ct"])
    labels = np.zeros(ct.shape, np.uint8)
    labels[np.asanyarray(ct.dataobj) > 150] = 1
    folder = f"/output/{case['case_id']}"
    os.makedirs(folder, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
print("valid outputs written; now filling /output/x/y/z", flush=True)
os.makedirs("/output/x/y/z", exist_ok=True)
chunk = b"\xab" * 2**20
written, index = 0, 0
while written < 3 * 2**30:
    try:
        with open(f"/output/x/y/z/fill{index}.bin", "wb") as handle:
            while written < 3 * 2**30:
                handle.write(chunk)
                written += len(chunk)
    except OSError as exc:  # the file size limit (EFBIG): go on with another file
        print(f"file {index} refused after {written} bytes: {exc}", flush=True)
        index += 1
print(f"wrote {written} bytes", flush=True)
