"""Classical segmenter (placeholder until tuned on the phantoms): HU windows only."""
import json
import os

import nibabel as nib
import numpy as np

for case in json.load(open("/input/cases.json"))["cases"]:
    ct = nib.load(case["ct"])
    hu = np.asanyarray(ct.dataobj)
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu >= 30) & (hu <= 90)] = 5
    folder = f"/output/{case['case_id']}"
    os.makedirs(folder, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
