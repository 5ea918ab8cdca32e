"""Speed of per-organ NSD on one full-size 9-organ case: ours vs DeepMind surface-distance vs MONAI.

    .venv/bin/python benchmarks/metrics.py [--repeats N] [--rebuild]

Builds (once, cached under ``benchmarks/.cache/``) a full-size phantom case (``evaluation.phantoms``,
512×512×~300 at ~0.8×0.8×1.5 mm) and an imperfect prediction of it (``make_prediction(kind="realistic")``);
if the phantom module is unusable it falls back to a small built-in generator (deformed ellipsoids and
tubes, shifted/eroded/dilated for the prediction) of exactly 512×512×300 at 0.8×0.8×1.5 mm.

Then, on the same in-memory masks (reading excluded; the per-organ boolean layout, as the oracles take):

* ``surface-distance`` (DeepMind): ``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``
  per organ at the ``nsd-deepmind`` tolerances, against ours under ``nsd-deepmind`` (surfel);
* MONAI on CPU: ``compute_surface_dice(class_thresholds=[1.5], spacing, include_background=True)``
  per organ, against ours under ``touchstone`` (voxel).

Ours is timed with the protocol narrowed to NSD (``CaseScorer(protocol, metrics=("nsd",))``), as the
anchors compute NSD only. Also printed: ours from the label-map layout, ours with every metric of the
preset, and our peak memory (a fresh subprocess scoring the cached case: VmHWM, and tracemalloc for
the scoring's own allocations).

The last line is exactly ``ratio_vs_deepmind=<float> ratio_vs_monai=<float> max_abs_diff=<float>``,
ratio = anchor seconds / our seconds for NSD of all 9 organs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.labels import LABEL_IDS  # noqa: E402
from evaluation.metrics import CaseScorer  # noqa: E402
from evaluation.protocols import load_protocol  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
CACHE_FILE = CACHE / "metrics_case_v1.npz"


# ------------------------------------------------------------------------------------------------
# the case
# ------------------------------------------------------------------------------------------------
def _builtin_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]:
    """Fallback generator: deformed ellipsoids and wobbling tubes at plausible positions."""
    from scipy import ndimage

    shape, spacing = (512, 512, 300), (0.8, 0.8, 1.5)
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    organs = {  # centre (mm), semi-axes (mm)
        "liver": ((250, 180, 260), (85, 75, 70)),
        "spleen": ((130, 290, 280), (45, 35, 55)),
        "kidney_left": ((140, 260, 200), (28, 25, 55)),
        "kidney_right": ((275, 260, 200), (28, 25, 55)),
        "stomach": ((160, 190, 300), (55, 40, 50)),
        "pancreas": ((200, 230, 240), (65, 14, 14)),
        "gall_bladder": ((260, 150, 230), (15, 13, 30)),
    }
    gt = np.zeros(shape, np.uint8)
    for organ, (c, ax) in organs.items():
        c, ax = np.asarray(c, float), np.asarray(ax, float)
        lo = np.maximum(((c - 1.3 * ax) / sp).astype(int), 0)
        hi = np.minimum(((c + 1.3 * ax) / sp).astype(int) + 1, shape)
        g = np.meshgrid(*[(np.arange(a, b) * s - cc) / r for a, b, s, cc, r in zip(lo, hi, sp, c, ax)], indexing="ij", sparse=True)
        r = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + 1e-9
        th, ph = np.arccos(np.clip(g[2] / r, -1, 1)), np.arctan2(g[1], g[0])
        bump = 1 + 0.12 * np.cos(3 * th + rng.uniform(0, 6)) * np.cos(2 * ph + rng.uniform(0, 6)) + 0.06 * np.cos(5 * ph + rng.uniform(0, 6))
        sub = gt[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        sub[(r <= bump) & (sub == 0)] = LABEL_IDS[organ]
    xs, ys = np.arange(shape[0]) * sp[0], np.arange(shape[1]) * sp[1]
    for organ, (cx0, cy, radius, wobble) in {"aorta": (195, 250, 12, 5), "postcava": (235, 245, 11, 4)}.items():
        phase = rng.uniform(0, 6)
        for z in range(int(60 / sp[2]), int(420 / sp[2])):
            cx = cx0 + wobble * np.sin(z / 40 + phase)
            disk = (xs[:, None] - cx) ** 2 + (ys[None, :] - cy) ** 2 <= radius**2
            sl = gt[:, :, z]
            sl[disk & (sl == 0)] = LABEL_IDS[organ]
    pred = np.zeros_like(gt)
    for i, (organ, label) in enumerate(LABEL_IDS.items()):
        m = gt == label
        m = np.roll(m, tuple(int(v) for v in rng.integers(-2, 3, 3)), (0, 1, 2))
        if i % 3 == 0:
            m = ndimage.binary_dilation(m)
        elif i % 3 == 1:
            m = ndimage.binary_erosion(m)
        pred[m & (pred == 0)] = label
    return np.asfortranarray(gt), np.asfortranarray(pred), spacing, "built-in ellipsoids (shift + erosion/dilation)"


def _phantom_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]:
    from evaluation import phantoms

    hospital = phantoms.make_hospitals(1, seed=seed)[0]
    case = phantoms.make_case("bench", hospital, size="full", rng=np.random.default_rng(seed))
    pred, _ = phantoms.make_prediction(case.labels, case.affine, "realistic", seed=seed + 1)
    return case.labels, pred, case.spacing, "evaluation.phantoms full + make_prediction(realistic)"


def load_case(rebuild: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]:
    if CACHE_FILE.exists() and not rebuild:
        data = np.load(CACHE_FILE)
        spacing = tuple(float(v) for v in data["spacing"])
        return np.asfortranarray(data["gt"]), np.asfortranarray(data["pred"]), spacing, str(data["source"])  # type: ignore[return-value]
    print("building the full-size case (once; cached under benchmarks/.cache/) ...", flush=True)
    try:
        gt, pred, spacing, source = _phantom_case()
        if gt.ndim != 3 or min(gt.shape[:2]) < 400:
            raise ValueError(f"phantom case has shape {gt.shape}, not full size")
    except Exception as exc:  # the phantom module belongs to another area; never let it block the benchmark
        print(f"evaluation.phantoms unusable ({exc!r}); using the built-in generator", flush=True)
        gt, pred, spacing, source = _builtin_case()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(CACHE_FILE, gt=gt, pred=pred, spacing=np.asarray(spacing), source=np.asarray(source))
    return gt, pred, spacing, source


def masks_of(label_map: np.ndarray) -> dict[str, np.ndarray]:
    return {organ: label_map == label for organ, label in LABEL_IDS.items()}


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def run_deepmind(gt_m, pred_m, spacing, tolerances) -> dict[str, float]:
    import surface_distance as sd

    out = {}
    for organ in LABEL_IDS:
        d = sd.compute_surface_distances(gt_m[organ], pred_m[organ], spacing)
        out[organ] = float(sd.compute_surface_dice_at_tolerance(d, tolerances[organ]))
    return out


def run_monai(gt_m, pred_m, spacing, tolerances) -> dict[str, float]:
    import torch
    from monai.metrics import compute_surface_dice

    out = {}
    for organ in LABEL_IDS:
        p = torch.from_numpy(pred_m[organ])[None, None]
        g = torch.from_numpy(gt_m[organ])[None, None]
        v = compute_surface_dice(p, g, [tolerances[organ]], include_background=True, spacing=list(spacing))
        out[organ] = float(v[0, 0])
    return out


def _vm_hwm_mib() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(layout: str) -> None:
    """Child process: load the cached case, score it once under both presets, print peak memory (MiB)."""
    import tracemalloc

    gt, pred, spacing, _ = load_case()
    if layout == "masks":
        gt_in, pred_in = masks_of(gt), masks_of(pred)
        del gt, pred
    else:
        gt_in, pred_in = gt, pred
    before = _vm_hwm_mib()
    tracemalloc.start()
    for name in ("touchstone", "nsd-deepmind"):
        CaseScorer(load_protocol(name))(pred_in, gt_in, spacing)
    _, scoring_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"inputs_and_imports_mib": before, "peak_mib": _vm_hwm_mib(), "scoring_alloc_peak_mib": scoring_peak / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (best is kept); anchors run once")
    parser.add_argument("--rebuild", action="store_true", help="regenerate the cached case")
    parser.add_argument("--memory-probe", choices=["masks", "labels"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    warnings.filterwarnings("ignore")
    if not hasattr(np, "Inf"):  # surface-distance 0.1 still spells np.Inf / np.NaN (gone in numpy 2)
        np.Inf, np.NaN = np.inf, np.nan  # type: ignore[attr-defined]

    gt, pred, spacing, source = load_case(args.rebuild)
    gt_m, pred_m = masks_of(gt), masks_of(pred)
    print(f"case: {source}; shape {gt.shape}, spacing {tuple(round(s, 4) for s in spacing)} mm")
    print("voxels per organ (gt / pred): " + ", ".join(f"{o} {int(gt_m[o].sum())}/{int(pred_m[o].sum())}" for o in LABEL_IDS))

    surfel_p, voxel_p = load_protocol("nsd-deepmind"), load_protocol("touchstone")
    ours_surfel = CaseScorer(surfel_p, metrics=("nsd",))
    ours_voxel = CaseScorer(voxel_p, metrics=("nsd",))

    t_dm, dm = best_of(lambda: run_deepmind(gt_m, pred_m, spacing, surfel_p.nsd_tolerance_mm), 1)
    t_ms, ms = best_of(lambda: ours_surfel(pred_m, gt_m, spacing), args.repeats)
    t_mo, mo = best_of(lambda: run_monai(gt_m, pred_m, spacing, voxel_p.nsd_tolerance_mm), 1)
    t_mv, mv = best_of(lambda: ours_voxel(pred_m, gt_m, spacing), args.repeats)
    t_ls, ls = best_of(lambda: ours_surfel(pred, gt, spacing), args.repeats)
    t_lv, lv = best_of(lambda: ours_voxel(pred, gt, spacing), args.repeats)
    t_full_s, _ = best_of(lambda: CaseScorer(surfel_p)(pred_m, gt_m, spacing), 1)
    t_full_v, _ = best_of(lambda: CaseScorer(voxel_p)(pred_m, gt_m, spacing), 1)

    print(f"\n{'organ':<14}{'deepmind':>12}{'ours surfel':>14}{'monai':>12}{'ours voxel':>13}")
    diffs = []
    for organ in LABEL_IDS:
        a, b = dm[organ], ms[organ]["nsd"]  # type: ignore[index]
        c, d = mo[organ], mv[organ]["nsd"]  # type: ignore[index]
        diffs += [abs(a - b), abs(c - d), abs(b - ls[organ]["nsd"]), abs(d - lv[organ]["nsd"])]  # type: ignore[index]
        print(f"{organ:<14}{a:>12.6f}{b:>14.6f}{c:>12.6f}{d:>13.6f}")
    max_abs_diff = float(max(diffs))

    print("\nNSD of all 9 organs, seconds (anchors: 1 run; ours: best of", args.repeats, "runs)")
    print(f"  surface-distance (DeepMind)          {t_dm:8.3f}")
    print(f"  ours, nsd-deepmind (surfel), masks   {t_ms:8.3f}   ratio {t_dm / t_ms:6.1f}x")
    print(f"  ours, nsd-deepmind (surfel), labels  {t_ls:8.3f}")
    print(f"  MONAI compute_surface_dice (CPU)     {t_mo:8.3f}")
    print(f"  ours, touchstone (voxel), masks      {t_mv:8.3f}   ratio {t_mo / t_mv:6.1f}x")
    print(f"  ours, touchstone (voxel), labels     {t_lv:8.3f}")
    print(f"  ours, full nsd-deepmind preset (dsc, nsd, hd95, assd), masks {t_full_s:8.3f}")
    print(f"  ours, full touchstone preset (dsc, nsd), masks               {t_full_v:8.3f}")

    for layout in ("labels", "masks"):
        probe = subprocess.run(
            [sys.executable, __file__, "--memory-probe", layout], capture_output=True, text=True, check=False
        )
        try:
            mem = json.loads(probe.stdout.strip().splitlines()[-1])
            print(
                f"peak memory, one process scoring the case from {layout} (both presets, all metrics): "
                f"{mem['peak_mib']:.0f} MiB (inputs + imports before scoring: {mem['inputs_and_imports_mib']:.0f} MiB; "
                f"peak of the scoring's own allocations: {mem['scoring_alloc_peak_mib']:.0f} MiB)"
            )
        except (IndexError, ValueError, KeyError):
            print(f"memory probe ({layout}) failed: {probe.stderr.strip()[-500:]}")

    print(f"ratio_vs_deepmind={t_dm / t_ms:.2f} ratio_vs_monai={t_mo / t_mv:.2f} max_abs_diff={max_abs_diff:.3g}")


if __name__ == "__main__":
    main()
