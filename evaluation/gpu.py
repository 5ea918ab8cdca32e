"""Optional torch path for the nearest-surface-point search (``touchstone evaluate --device cuda``).

The CPU path (:mod:`evaluation.metrics`) needs nothing from here. This module imports torch only
when a scorer is made, and says clearly what is missing when torch or CUDA is absent:

    from evaluation.gpu import GpuCaseScorer
    scores = GpuCaseScorer(protocol, device="cuda")(pred, gt, spacing_mm)

What runs on the device: the exhaustive nearest-neighbour search between the two surfaces
(``torch.cdist`` without the matrix-product shortcut, float64, in chunks), which is the costly part
of HD95 and ASSD. Cropping, surfaces, the exact distance formula of each oracle and the NSD-only
look-ups stay on the CPU, so the values are those of :class:`evaluation.metrics.CaseScorer`
(``device="cpu"`` runs the same code on CPU torch, which is what the unit tests check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluation._surface import NearestFn
from evaluation.metrics import CaseScorer

if TYPE_CHECKING:  # pragma: no cover
    from evaluation.protocols import Protocol

__all__ = ["GpuUnavailableError", "GpuCaseScorer", "compute_case_metrics", "torch_nearest"]

#: query rows × target points per cdist chunk (float64: 8 bytes each → 256 MiB)
_CHUNK_ELEMENTS = 1 << 25


class GpuUnavailableError(RuntimeError):
    """The torch path was asked for but torch, or the requested device, is not there."""


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise GpuUnavailableError(
            "the GPU path needs PyTorch, which is not installed: install it with "
            "`pip install 'touchstone[gpu]'`, or score on the CPU (the default, --device cpu)"
        ) from None
    return torch


def resolve_device(device: str) -> Any:
    """A ``torch.device`` for ``device`` ("cuda", "cuda:1", "cpu"), or :class:`GpuUnavailableError`."""
    torch = _torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GpuUnavailableError(f"unknown device {device!r} ({exc}); use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GpuUnavailableError(
                "device 'cuda' was requested but PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "check the driver and the container's GPU access, or score on the CPU (--device cpu)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GpuUnavailableError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif dev.type != "cpu":
        raise GpuUnavailableError(f"device type {dev.type!r} is not supported; use 'cuda' or 'cpu'")
    return dev


def torch_nearest(device: str = "cuda") -> NearestFn:
    """A nearest-surface-point backend for :class:`~evaluation.metrics.CaseScorer` running on ``device``."""
    torch = _torch()
    dev = resolve_device(device)

    def nearest(query: np.ndarray, target: np.ndarray, spacing: np.ndarray, bound: float) -> np.ndarray:
        q = torch.as_tensor(query * spacing, dtype=torch.float64, device=dev)
        t = torch.as_tensor(target * spacing, dtype=torch.float64, device=dev)
        rows = max(1, _CHUNK_ELEMENTS // max(1, len(target)))
        out = np.empty(len(query), dtype=np.int64)
        for start in range(0, len(query), rows):
            d = torch.cdist(q[start : start + rows], t, compute_mode="donot_use_mm_for_euclid_dist")
            best, idx = torch.min(d, dim=1)
            idx = torch.where(best <= bound, idx, torch.full_like(idx, -1)) if np.isfinite(bound) else idx
            out[start : start + rows] = idx.cpu().numpy()
        return out

    return nearest


class GpuCaseScorer(CaseScorer):
    """:class:`~evaluation.metrics.CaseScorer` whose nearest-point search runs in torch on ``device``."""

    def __init__(self, protocol: Protocol, metrics: Sequence[str] | None = None, device: str = "cuda"):
        super().__init__(protocol, metrics=metrics, nearest=torch_nearest(device))
        self.device = device


def compute_case_metrics(
    pred: Any, gt: Any, spacing_mm: tuple[float, float, float], protocol: Protocol, device: str = "cuda"
) -> dict[str, dict[str, float]]:
    """:func:`evaluation.metrics.compute_case_metrics` with the nearest-point search on ``device``."""
    return GpuCaseScorer(protocol, device=device)(pred, gt, spacing_mm)
