"""Test algorithm: the trivial threshold segmenter, slowed to SECONDS_PER_CASE per case, so a test
can kill its worker, restart Redis or cancel while it runs. Public-sample runs are not slowed
(validation stays fast) unless the image sets SLOW_PUBLIC_S (the engine-restart test's variant);
a case is recognised as hidden when /input holds more than one case.

The segmentation lines repeat examples/algorithms/trivial/run.py on purpose: this file is the whole
build context of its own test image (tests/integration/pipeline/conftest.py), so it cannot import
the example; the trivial example stays the readable reference a team copies."""
import json
import os
import time

import nibabel as nib
import numpy as np

SECONDS_PER_CASE = 2.0
cases = json.load(open("/input/cases.json"))["cases"]
for case in cases:
    if len(cases) > 1:
        time.sleep(SECONDS_PER_CASE)
    elif os.environ.get("SLOW_PUBLIC_S"):
        time.sleep(float(os.environ["SLOW_PUBLIC_S"]))
    ct = nib.load(case["ct"])
    hu = np.asanyarray(ct.dataobj)
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu >= 30) & (hu <= 90)] = 5
    labels[hu > 150] = 1
    folder = f"/output/{case['case_id']}"
    os.makedirs(folder, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, ct.affine), f"{folder}/combined_labels.nii.gz")
    print(f"{case['case_id']}: done", flush=True)
