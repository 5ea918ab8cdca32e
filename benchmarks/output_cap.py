"""How far past the output byte cap a full-speed writer gets before the worker stops it.

    python benchmarks/output_cap.py [--caps-mib 64,512,2048] [--repeat 2]

Runs ``examples/algorithms/deep-writer`` (valid outputs, then 1 MiB writes into
``/output/x/y/z/fill<i>.bin`` up to 3 GiB) under the real sandbox (``worker.runtime.docker``) with
each byte cap, and measures the bytes left on disk in ``/output`` when the run has been stopped.
The anchor is the cap itself: ``overshoot = (on_disk - cap) / cap``. Needs the Docker engine and
the example image (``bash scripts/build-examples.sh``). Last line:
``max_overshoot_pct=<float> at_default_cap_pct=<float>`` (the default cap is the worker's
``TOUCHSTONE_WORKER_OUTPUT_BYTES``, 2 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = "touchstone/example-deep-writer:latest"


def main() -> None:
    from evaluation.io import write_ct
    from worker.app import WorkerSettings
    from worker.monitoring import measure_tree
    from worker.runtime.base import FailureCode, ResourceLimits, RunSpec
    from worker.runtime.docker import DockerRuntime
    from worker.sandbox import prepare_output_dir
    from worker.staging import stage_shard

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--caps-mib", default="64,512,2048")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    default_cap = WorkerSettings().output_bytes
    runtime = DockerRuntime()
    limits = ResourceLimits(memory_bytes=512 * 2**20, cpus=1.0, pids=64, shm_bytes=16 * 2**20,
                            tmp_bytes=32 * 2**20, output_bytes=default_cap, log_bytes=8 * 2**10)
    overshoots: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="touchstone-output-cap-") as tmp:
        root = Path(tmp)
        hu = np.random.default_rng(0).normal(50, 20, size=(16, 14, 10))
        ct = write_ct(root / "storage" / "case_a", hu, np.diag([2.0, 2.0, 3.0, 1.0]))
        for cap_mib in (int(c) for c in args.caps_mib.split(",")):
            cap = cap_mib * 2**20
            for attempt in range(args.repeat):
                staged = stage_shard([("case_a", ct)], root / f"stage-{cap_mib}-{attempt}")
                output = prepare_output_dir(root / f"out-{cap_mib}-{attempt}")
                spec = RunSpec(image=IMAGE, input_dir=staged.input_dir, output_dir=output, time_limit_s=300,
                               limits=dataclasses.replace(limits, output_bytes=cap), extra_input_mounts=staged.mounts,
                               case_ids=staged.case_ids, submission_id="bench-output-cap", shard_id=f"{cap_mib}-{attempt}")
                started = time.monotonic()
                result = runtime.run(spec)
                elapsed = time.monotonic() - started
                on_disk = measure_tree(output).bytes
                if result.failure is None or result.failure.code is not FailureCode.OUTPUT_TOO_LARGE:
                    raise SystemExit(f"cap {cap_mib} MiB: expected output_too_large, got {result.failure}")
                overshoot = (on_disk - cap) / cap
                overshoots.setdefault(cap_mib, []).append(overshoot)
                print(f"cap {cap_mib:>5} MiB: {on_disk / 2**20:9.1f} MiB on disk, overshoot {overshoot:+7.2%}, "
                      f"stopped after {result.duration_s:.2f} s (call {elapsed:.2f} s)", flush=True)
                import shutil

                shutil.rmtree(output, ignore_errors=True)
    worst = max(max(v) for v in overshoots.values())
    at_default = max(overshoots.get(default_cap // 2**20, [float("nan")]))
    print(f"max_overshoot_pct={100 * worst:.2f} at_default_cap_pct={100 * at_default:.2f}")


if __name__ == "__main__":
    main()
