"""The optional torch path: clear errors without CUDA or torch, same values as the CPU path on CPU torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluation import gpu
from evaluation.labels import LABEL_IDS
from evaluation.metrics import CaseScorer
from evaluation.protocols import Protocol, load_protocol


def _case(seed=0, shape=(20, 18, 16)):
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    for i, label in enumerate(LABEL_IDS.values()):
        gt[1 + 2 * i : 3 + 2 * i, 2 : 8 + i % 5, 2 : 9 + i % 4] = label
    pred = np.roll(gt, tuple(int(v) for v in rng.integers(-1, 2, 3)), (0, 1, 2))
    pred[rng.random(shape) < 0.002] = 5  # scattered false positives far from the liver
    return gt, pred


@pytest.mark.parametrize("name", ["touchstone", "nsd-deepmind"])
def test_cpu_torch_backend_agrees_with_the_cpu_path(name):
    base = load_protocol(name).to_dict()
    protocol = Protocol.model_validate({**base, "metrics": ["dsc", "nsd", "hd95", "assd"]})
    gt, pred = _case()
    ours = CaseScorer(protocol)(pred, gt, (0.8, 1.1, 1.5))
    on_torch = gpu.GpuCaseScorer(protocol, device="cpu")(pred, gt, (0.8, 1.1, 1.5))
    assert on_torch.keys() == ours.keys()
    for organ in ours:
        for metric, value in ours[organ].items():
            assert on_torch[organ][metric] == pytest.approx(value, abs=1e-9, nan_ok=True), (organ, metric)


def test_cuda_request_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu.GpuUnavailableError, match="no CUDA GPU.*--device cpu"):
        gpu.GpuCaseScorer(load_protocol("touchstone"), device="cuda")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(gpu.GpuUnavailableError, match="unknown device"):
        gpu.resolve_device("tpu-ish")


def test_missing_torch_is_a_clear_error():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from evaluation import gpu\n"
        "from evaluation.protocols import load_protocol\n"
        "try:\n"
        "    gpu.GpuCaseScorer(load_protocol('touchstone'))\n"
        "except gpu.GpuUnavailableError as e:\n"
        "    print(e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "touchstone[gpu]" in run.stdout
