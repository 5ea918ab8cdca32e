"""Scoring throughput at full size: ``touchstone evaluate --workers N`` on full-size phantoms.

    .venv/bin/python benchmarks/evaluate_throughput.py [--cases 8] [--workers 1,2] [--workdir DIR]

Writes ``--cases`` full-size phantoms (``touchstone phantoms --size full``: 512 x 512 x ~300
voxels, the hospital's slice count) and predictions shifted by 2 voxels
(``touchstone phantom-predictions --kind shift --magnitude 2``: every organ has a surface error,
so DSC, NSD and HD95 all do real work) into the work folder (kept and reused when it is given),
then runs the real CLI, ``touchstone evaluate --gt ... --pred ... --workers N --out ...``, once
per N as a subprocess, and samples the memory of its process tree every 0.1 s (psutil, see
benchmarks/process_memory.py). Per N it prints the wall time of the whole command (start-up,
reading, scoring, writing the CSV), cases per minute, the CPU time of the command and its pool
processes (``os.wait4``: independent of other load on the machine; CPU / wall = cores the run
kept busy), and the peak RSS of the main process and of each scoring process (with N = 1 the
main process scores). The CSVs of all runs must be identical
(the same rows whatever the number of workers).

The ratio ``speedup = cases_per_minute(N_max) / cases_per_minute(1)`` is measured in the same
run. Last line: ``cases_per_minute_1=<float> cases_per_minute_<N>=<float> speedup=<float>
cpu_s_per_case=<float> peak_worker_rss_mib=<float> cases=<int>`` (CPU seconds per case of the
one-worker run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.process_memory import MemorySampler, mib  # noqa: E402

TOUCHSTONE = [sys.executable, "-m", "services.cli.main"]


def touchstone_command() -> list[str]:
    """The ``touchstone`` entry point of this venv (falls back to the module)."""
    script = Path(sys.executable).with_name("touchstone")
    return [str(script)] if script.exists() else TOUCHSTONE


def prepare(work: Path, cases: int) -> tuple[Path, Path]:
    gt, pred = work / f"full-{cases}", work / f"full-{cases}-pred-shift2"
    command = touchstone_command()
    if not (gt / "manifest.csv").exists():
        print(f"writing {cases} full-size phantoms to {gt} ...", flush=True)
        subprocess.run([*command, "phantoms", "--out", str(gt), "--cases", str(cases), "--size", "full",
                        "--seed", "10"], check=True)
    if not pred.is_dir() or sum(1 for p in pred.iterdir() if p.is_dir()) < cases:
        print(f"writing predictions (shift by 2 voxels) to {pred} ...", flush=True)
        subprocess.run([*command, "phantom-predictions", "--gt", str(gt), "--out", str(pred), "--kind", "shift",
                        "--magnitude", "2", "--seed", "10"], check=True)
    return gt, pred


def run_once(gt: Path, pred: Path, out: Path, workers: int) -> dict:
    argv = [*touchstone_command(), "evaluate", "--gt", str(gt), "--pred", str(pred), "--workers", str(workers),
            "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=ROOT)
    with MemorySampler({"evaluate": process.pid}, interval_s=0.1) as sampler:
        # wait4: the exit status and the CPU time of the command and of the pool processes it waited for
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"touchstone evaluate --workers {workers} exited with {code}")
    tree = sampler.trees["evaluate"]
    main_rss = tree.peak_process_rss.get(process.pid, 0)
    children = {pid: rss for pid, rss in tree.peak_process_rss.items()
                if pid != process.pid and "resource_tracker" not in tree.process_names.get(pid, "")
                and "forkserver" not in tree.process_names.get(pid, "")}
    scoring = list(children.values()) if workers > 1 else [main_rss]
    return {"workers": workers, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "main_rss": main_rss,
            "scoring_rss": scoring, "total_rss": tree.peak_total_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (kept; default: a temporary one)")
    args = parser.parse_args()
    counts = sorted({int(w) for w in args.workers.split(",")})
    if counts[0] != 1:
        parser.error("--workers must include 1 (the anchor of the ratio)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="touchstone-bench-evaluate-"))
    work.mkdir(parents=True, exist_ok=True)
    gt, pred = prepare(work, args.cases)
    size = sum(f.stat().st_size for f in gt.rglob("*.nii.gz"))
    print(f"{args.cases} full-size cases ({size / 1e6:.0f} MB of ground truth + CT), "
          f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = []
    outputs = []
    for workers in counts:
        out = work / f"results-w{workers}.csv"
        result = run_once(gt, pred, out, workers)
        result["cases_per_minute"] = 60 * args.cases / result["wall"]
        results.append(result)
        outputs.append(out.read_bytes())
        print(f"--workers {workers}: {result['wall']:.1f} s, {result['cases_per_minute']:.2f} cases/min; CPU "
              f"{result['cpu']:.1f} s ({result['cpu'] / args.cases:.1f} s per case, {result['cpu'] / result['wall']:.2f} "
              f"cores busy on average); peak RSS "
              f"main {mib(result['main_rss']):.0f} MiB, per scoring process "
              f"{', '.join(f'{mib(r):.0f}' for r in result['scoring_rss'])} MiB, tree total "
              f"{mib(result['total_rss']):.0f} MiB; load average {os.getloadavg()[0]:.2f}", flush=True)
    assert all(o == outputs[0] for o in outputs), "the results differ between worker counts"
    print("results identical for every worker count")
    first, last = results[0], results[-1]
    peak_worker = max(max(r["scoring_rss"]) for r in results)
    print(f"cases_per_minute_1={first['cases_per_minute']:.2f} "
          f"cases_per_minute_{last['workers']}={last['cases_per_minute']:.2f} "
          f"speedup={last['cases_per_minute'] / first['cases_per_minute']:.2f} "
          f"cpu_s_per_case={first['cpu'] / args.cases:.2f} "
          f"peak_worker_rss_mib={mib(peak_worker):.0f} cases={args.cases}")


if __name__ == "__main__":
    main()
