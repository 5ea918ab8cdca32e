#!/usr/bin/env bash
# GPU acceptance check, one short run (no Docker needed):
#
#   bash scripts/gpu-check.sh            # on a machine with an NVIDIA GPU and CUDA torch in .venv
#
# (a) scoring: `touchstone evaluate` of phantom predictions on the CPU (numpy) and with
#     `--device cuda`; every value must agree within 1e-6; prints the speed ratio;
# (b) the MONAI reference model (examples/algorithms/monai-segresnet/predict.py, outside Docker)
#     on the GPU against the CPU: time per case, and how many voxels agree;
# (c) a real CUDA process's device memory read through the worker's NVML monitor
#     (worker.monitoring.GpuMemoryMonitor, as the worker samples containers) against that
#     process's torch.cuda.max_memory_allocated (NVML counts more: context, allocator cache).
#
# Without a GPU it says so, runs the CPU halves on tiny phantoms (< 1 minute: (a) compares the numpy
# path with the same torch path on the CPU, `--device cpu:0`; (b) times the CPU; (c) checks that the
# monitor reports nothing) and exits 0. Exit 1 when a check fails. Sizes: GPU_CHECK_SIZE
# (tiny|small|full; default full with a GPU, tiny without), GPU_CHECK_CASES (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
exec "$PY" - "$@" <<'PYEOF'
import csv, math, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path.cwd()
sys.path[:0] = [str(ROOT), str(ROOT / "examples/algorithms/monai-segresnet")]
import numpy as np
import torch

GPU = torch.cuda.is_available()
SIZE = os.environ.get("GPU_CHECK_SIZE") or ("full" if GPU else "tiny")
N = int(os.environ.get("GPU_CHECK_CASES", "2"))
DEV = "cuda" if GPU else "cpu:0"
failed: list[str] = []


def say(line: str) -> None:
    print(f"[gpu-check] {line}", flush=True)


def check(ok: bool, what: str) -> None:
    say(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failed.append(what)


if GPU:
    say(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    say(f"no GPU: torch {torch.__version__} sees no CUDA device; running the CPU halves only")
say(f"phantoms: {N} x {SIZE}")

from evaluation.phantoms import write_phantom_set, write_predictions  # noqa: E402

tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
write_phantom_set(tmp / "gt", N, n_hospitals=2, size=SIZE, seed=11)
write_predictions(tmp / "gt", tmp / "pred", "realistic", seed=1)

# (a) scoring ------------------------------------------------------------------------------------
touchstone = [sys.executable, "-m", "services.cli.main"] if not (ROOT / ".venv/bin/touchstone").exists() \
    else [str(ROOT / ".venv/bin/touchstone")]


def evaluate(device: str, protocol: str, out: Path) -> float:
    start = time.monotonic()
    subprocess.run([*touchstone, "evaluate", "--gt", str(tmp / "gt"), "--pred", str(tmp / "pred"), "--protocol",
                    protocol, "--out", str(out), "--device", device], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(r["case_id"], r["organ"]): r for r in csv.DictReader(handle)}


# touchstone: DSC + NSD on voxel surfaces; nsd-deepmind: DSC, NSD, HD95, ASSD on surfels
for protocol in ("touchstone", "nsd-deepmind"):
    t_cpu = evaluate("cpu", protocol, tmp / f"cpu-{protocol}.csv")
    t_dev = evaluate(DEV, protocol, tmp / f"dev-{protocol}.csv")
    a, b = rows(tmp / f"cpu-{protocol}.csv"), rows(tmp / f"dev-{protocol}.csv")
    worst, compared = 0.0, 0
    for key, row in a.items():
        for column, value in row.items():
            try:
                x, y = float(value), float(b[key][column])
            except (ValueError, KeyError):
                continue
            compared += 1
            if (math.isnan(x) and math.isnan(y)) or x == y:
                continue
            worst = max(worst, abs(x - y))
    check(a.keys() == b.keys() and compared > 0 and worst <= 1e-6,
          f"(a) {protocol}: numpy CPU vs --device {DEV}, {compared} values, max |difference| {worst:.2e} (<= 1e-6)")
    say(f"(a) {protocol} time: CPU {t_cpu:.2f} s, {DEV} {t_dev:.2f} s, ratio CPU/{DEV} {t_cpu / t_dev:.2f}")

# (b) the MONAI model ----------------------------------------------------------------------------
import predict  # noqa: E402

cts = sorted((tmp / "gt").glob("*/ct.nii.gz"))
transforms = predict.preprocess()
results: dict[str, tuple[float, list[np.ndarray]]] = {}
for name in ["cpu"] + (["cuda"] if GPU else []):
    device = torch.device(name)
    model = predict.load_model(device)
    predict.predict_case(model, cts[0], device, transforms)  # warm-up: kernels, allocator
    if GPU:
        torch.cuda.synchronize()
    start, labels = time.monotonic(), []
    for ct in cts:
        labels.append(predict.predict_case(model, ct, device, transforms))
    if GPU:
        torch.cuda.synchronize()
    results[name] = ((time.monotonic() - start) / len(cts), labels)
    say(f"(b) MONAI SegResNet on {name}: {results[name][0]:.2f} s per case ({len(cts)} cases, {SIZE})")
if GPU:
    agree = np.mean([np.mean(x == y) for x, y in zip(results["cpu"][1], results["cuda"][1])])
    check(agree > 0.999, f"(b) labels on cuda vs cpu: {agree:.5f} of voxels equal (> 0.999)")
    say(f"(b) speed ratio CPU/GPU per case: {results['cpu'][0] / results['cuda'][0]:.1f}")

# (c) NVML monitor against a real CUDA process ---------------------------------------------------
from worker.monitoring import GpuMemoryMonitor, PeriodicSampler  # noqa: E402

if not GPU:
    monitor = GpuMemoryMonitor(["0"])
    started = monitor.start()
    check(not started and monitor.stats() is None, "(c) NVML monitor without a GPU: reports nothing (start() False)")
else:
    child = r'''
import sys, time, torch
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda"); x.fill_(1)
y = torch.randn(4096, 4096, device="cuda") @ torch.randn(4096, 4096, device="cuda")
torch.cuda.synchronize(); time.sleep(1.0)
print(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), flush=True)
'''
    monitor = GpuMemoryMonitor(["0"])
    check(monitor.start(), "(c) NVML monitor started on GPU 0")
    sampler = PeriodicSampler([monitor]).start()
    out = subprocess.run([sys.executable, "-c", child, str(1 << 30)], check=True, capture_output=True, text=True)
    sampler.stop()
    stats = monitor.stop()
    allocated, reserved = (int(v) for v in out.stdout.split())
    seen = stats.peak_bytes - stats.baseline_bytes if stats else -1
    say(f"(c) NVML peak {stats.peak_bytes / 2**20:.0f} MiB (baseline {stats.baseline_bytes / 2**20:.0f} MiB, "
        f"{stats.samples} samples); torch max_memory_allocated {allocated / 2**20:.0f} MiB, reserved "
        f"{reserved / 2**20:.0f} MiB")
    check(allocated <= seen <= reserved + (1 << 30),
          "(c) NVML peak above baseline within [max_memory_allocated, max_memory_reserved + 1 GiB (context)]")

if failed:
    say(f"FAILED: {len(failed)} check(s)")
    sys.exit(1)
say("all checks passed" + ("" if GPU else " (CPU halves only: no GPU on this machine)"))
PYEOF
