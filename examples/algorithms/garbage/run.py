"""Misbehaving example: writes files with the right names but random, non-NIfTI content."""
import json
import os

cases = json.load(open("/input/cases.json"))["cases"]
for case in cases:
    folder = f"/output/{case['case_id']}"
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/combined_labels.nii.gz", "wb") as handle:
        handle.write(os.urandom(4096))
print(f"wrote garbage for {len(cases)} case(s)")
