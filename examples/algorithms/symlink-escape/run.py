"""Misbehaving example: writes symbolic links (to /etc/passwd and to its own input CT) as outputs."""
import json
import os

for case in json.load(open("/input/cases.json"))["cases"]:
    folder = f"/output/{case['case_id']}"
    os.makedirs(f"{folder}/segmentations", exist_ok=True)
    os.symlink("/etc/passwd", f"{folder}/combined_labels.nii.gz")
    os.symlink(case["ct"], f"{folder}/segmentations/liver.nii.gz")
print("wrote symlinks")
