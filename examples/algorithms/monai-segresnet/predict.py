"""MONAI SegResNet for the 9 Touchstone organs: the container's entry point (and the model's code).

Container contract: reads /input/cases.json and /input/<case_id>/ct.nii.gz, writes
/output/<case_id>/combined_labels.nii.gz on the CT's own grid (its shape and affine), one case after
the other, each as soon as it is done.

Per case: LoadImage → EnsureChannelFirst → Orientation (RAS) → Spacing (SPACING mm) →
ScaleIntensityRange (HU A_MIN..A_MAX → 0..1) → sliding_window_inference (ROI, Gaussian blending) →
softmax → inverse of Orientation and Spacing (MONAI's Invertd: back to the CT's grid, probabilities
interpolated linearly; nearest-neighbour on the label map for CTs too large for that) → argmax →
uint8 label map with the CT's own affine.

Uses CUDA when the container sees a GPU, the CPU otherwise, and says which in its log.
train.py (same folder) imports the model and transforms from here, so training and inference
preprocess identically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

N_CLASSES = 10  # background + 9 organs (labels 1 aorta ... 9 stomach, evaluation/labels.py)
SPACING = (6.0, 6.0, 6.0)  # mm; the tiny phantoms are stored at about 5.7-6.6 × 4.8-5.4 mm
ROI = (64, 64, 64)
A_MIN, A_MAX = -250.0, 450.0  # HU window: fat (-100) ... contrast-enhanced vessels; bone clipped
CHECKPOINT = Path(__file__).resolve().parent / "segresnet.pt"
#: above this many probability values (classes × voxels), invert the label map (nearest) instead
MAX_PROB_VALUES = 256 * 2**20


def build_model() -> torch.nn.Module:
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=N_CLASSES, init_filters=8)


def preprocess(keys: tuple[str, ...] = ("image",)) -> Compose:
    """The transforms of training and inference; ``keys`` = ("image",) or ("image", "label")."""
    modes = tuple("nearest" if k == "label" else "bilinear" for k in keys)
    return Compose([
        LoadImaged(keys=list(keys), image_only=True),
        EnsureChannelFirstd(keys=list(keys)),
        Orientationd(keys=list(keys), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=list(keys), pixdim=SPACING, mode=modes),
        ScaleIntensityRanged(keys=["image"], a_min=A_MIN, a_max=A_MAX, b_min=0.0, b_max=1.0, clip=True),
    ])


def pick_device() -> tuple[torch.device, str]:
    """CUDA when a GPU is visible, else the CPU; and a line that says which."""
    if torch.cuda.is_available():
        return torch.device("cuda"), f"device: cuda ({torch.cuda.get_device_name(0)})"
    return torch.device("cpu"), f"device: cpu (no GPU visible; {torch.get_num_threads()} threads)"


def cpu_quota() -> int:
    """CPUs this container may use: the cgroup's CPU quota (docker --cpus), else the affinity set."""
    n = len(os.sched_getaffinity(0))
    for files in (("cpu.max",), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):  # cgroup v2, v1
        try:
            values = " ".join(Path("/sys/fs/cgroup", f).read_text() for f in files).split()[:2]
            if values[0] not in ("max", "-1"):
                return min(n, max(1, round(int(values[0]) / int(values[1]))))
        except (OSError, ValueError, IndexError):
            continue
    return n


def load_model(device: torch.device, checkpoint: Path = CHECKPOINT) -> torch.nn.Module:
    model = build_model()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    return model.to(device).eval()


def predict_case(model: torch.nn.Module, ct_path: str | Path, device: torch.device,
                 transforms: Compose | None = None) -> np.ndarray:
    """Label map (uint8) of one CT on the CT's own voxel grid."""
    transforms = transforms or preprocess()
    data = transforms({"image": str(ct_path)})
    image = data["image"]
    with torch.inference_mode():
        logits = sliding_window_inference(image[None].to(device), ROI, sw_batch_size=1, predictor=model,
                                          overlap=0.25, mode="gaussian")[0]
        if logits.numel() <= MAX_PROB_VALUES:
            pred, nearest = torch.softmax(logits, dim=0), False
        else:  # large CT: invert the label map, not 10 float channels
            pred, nearest = logits.argmax(dim=0, keepdim=True).to(torch.uint8), True
    data["pred"] = pred.cpu()
    inverted = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=nearest)(data)["pred"]
    labels = np.asarray(inverted[0] if nearest else inverted.argmax(dim=0)).astype(np.uint8)
    return labels


def main() -> int:
    torch.set_num_threads(cpu_quota())
    device, line = pick_device()
    print(line, flush=True)
    model = load_model(device)
    transforms = preprocess()
    cases = json.loads(Path("/input/cases.json").read_text())["cases"]
    print(f"{len(cases)} case(s)", flush=True)
    for case in cases:
        start = time.monotonic()
        ct = nib.load(case["ct"])
        labels = predict_case(model, case["ct"], device, transforms)
        if labels.shape != ct.shape[:3]:
            raise RuntimeError(f"{case['case_id']}: label map {labels.shape} is not on the CT grid {ct.shape}")
        out = Path("/output") / case["case_id"]
        out.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(labels, ct.affine)
        image.set_data_dtype(np.uint8)
        nib.save(image, out / "combined_labels.nii.gz")
        print(f"{case['case_id']} done in {time.monotonic() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
