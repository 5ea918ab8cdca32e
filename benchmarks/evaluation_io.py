"""Reading speed of one full-size phantom case (512×512×~300): ISA-L (isal) vs plain zlib inflate,
and nibabel's own loader as the anchor. Reading only, no scoring.

    .venv/bin/python benchmarks/evaluation_io.py [--cache DIR] [--repeat 3]

Last line (CPU seconds): ``isal_s=<CT+9 masks, s> zlib_s=<s> nibabel_s=<s> ratio_zlib_over_isal=<x>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from evaluation import io
from evaluation.labels import LABEL_IDS
from evaluation.phantoms import generate_cases, write_case


def _case(cache: Path) -> Path:
    case_dir = cache / "phantom_00000"
    if not (case_dir / "segmentations" / "stomach.nii.gz").exists():
        case = next(generate_cases(1, size="full", seed=0))
        write_case(case, cache)
    return case_dir


# CPU seconds of this (single-threaded) process: robust when other jobs share the cores; wall
# seconds are printed too.
def _read_all(case_dir: Path) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    io.read_ct(case_dir / "ct.nii.gz")
    io.read_labels(case_dir, LABEL_IDS, untrusted=True)
    return time.process_time() - c, time.perf_counter() - t


def _read_nibabel(case_dir: Path) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    nib.load(case_dir / "ct.nii.gz").get_fdata(dtype=np.float32)
    for organ in LABEL_IDS:
        np.asarray(nib.load(case_dir / "segmentations" / f"{organ}.nii.gz").dataobj)
    return time.process_time() - c, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "touchstone-bench-io")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    case_dir = _case(args.cache)
    ct_shape = nib.load(case_dir / "ct.nii.gz").shape
    size_mb = sum(p.stat().st_size for p in case_dir.rglob("*.nii.gz")) / 2**20
    print(f"case {case_dir} shape {ct_shape}, {size_mb:.1f} MiB on disk (CT + 9 masks)")
    assert io.GZIP_BACKEND == "isal", "isal is not installed: this benchmark compares it with zlib"
    isal_impl = io._zlib_impl
    results = {}
    for name, impl in (("isal", isal_impl), ("zlib", zlib)):
        io._zlib_impl = impl
        _read_all(case_dir)  # warm the page cache
        cpu, wall = min(_read_all(case_dir) for _ in range(args.repeat))
        results[name] = cpu
        print(f"{name}: {cpu:.3f} CPU s, {wall:.3f} wall s (best of {args.repeat})")
    io._zlib_impl = isal_impl
    cpu, wall = min(_read_nibabel(case_dir) for _ in range(args.repeat))
    results["nibabel"] = cpu
    print(f"nibabel.load: {cpu:.3f} CPU s, {wall:.3f} wall s (best of {args.repeat})")
    print(
        f"isal_s={results['isal']:.3f} zlib_s={results['zlib']:.3f} nibabel_s={results['nibabel']:.3f} "
        f"ratio_zlib_over_isal={results['zlib'] / results['isal']:.2f}"
    )


if __name__ == "__main__":
    main()
