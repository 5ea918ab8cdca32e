"""Benchmark of the statistics: 20 algorithms x 9 organs x 5,903 cases (synthetic, seeded).

Per organ (all 9, not the average): all K(K-1) = 380 one-sided paired Wilcoxon tests with Holm
over the 380 ordered pairs, and a 1,000-sample bootstrap ranking (aggregate-then-rank by mean,
the same resampled cases for every algorithm) with rank distributions and Kendall's tau. The
timed total (last line ``stats_seconds=<float>``) covers exactly these two; the per-algorithm
summaries with percentile and BCa intervals are timed separately on one organ for information.

Synthetic DSC: algorithm skill + case difficulty + noise, clipped to [0, 1], rounded to 4 digits
(so ties and zero differences occur as in real score tables), 1 % of cells not scored.

Run: ``.venv/bin/python benchmarks/stats.py [--resamples 1000] [--cases 5903]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from evaluation.labels import ORGANS
from evaluation.stats import ScoreMatrix, bootstrap_rank_stability, pairwise_wilcoxon, summarize


def synthetic(n_algorithms: int, n_cases: int, seed: int) -> list[ScoreMatrix]:
    rng = np.random.default_rng(seed)
    algorithms = [f"algo{k:02d}" for k in range(n_algorithms)]
    case_ids = [f"case{j:05d}" for j in range(n_cases)]
    out = []
    for organ in ORGANS:
        skill = rng.normal(0.0, 0.02, (n_algorithms, 1))
        difficulty = rng.normal(0.8, 0.1, (1, n_cases))
        values = np.clip(skill + difficulty + rng.normal(0, 0.05, (n_algorithms, n_cases)), 0, 1)
        values = np.round(values, 4)
        values[rng.random(values.shape) < 0.01] = np.nan
        out.append(ScoreMatrix(organ, "dsc", algorithms, case_ids, values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", type=int, default=20)
    parser.add_argument("--cases", type=int, default=5903)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    matrices = synthetic(args.algorithms, args.cases, args.seed)
    k = args.algorithms
    print(
        f"stats benchmark: {k} algorithms x {len(matrices)} organs x {args.cases} cases; "
        f"{k * (k - 1)} ordered pairs per organ (Holm), {args.resamples} bootstrap resamples per "
        f"organ; cpus={os.cpu_count()}"
    )
    t_tests = t_boot = 0.0
    for m in matrices:
        t0 = time.perf_counter()
        pairwise = pairwise_wilcoxon(m, correction="holm")
        t1 = time.perf_counter()
        stability = bootstrap_rank_stability(m, "mean", n_resamples=args.resamples, seed=args.seed)
        t2 = time.perf_counter()
        t_tests += t1 - t0
        t_boot += t2 - t1
        print(
            f"  {m.organ:13s} wilcoxon+holm {t1 - t0:6.2f} s ({len(pairwise)} tests, "
            f"{int(pairwise['significant'].sum())} significant)  bootstrap ranking {t2 - t1:6.2f} s "
            f"(median tau {stability.tau_summary()['tau_median']:.3f})"
        )
    t0 = time.perf_counter()
    summarize(matrices[0], n_resamples=args.resamples, seed=args.seed)
    t_summary = time.perf_counter() - t0
    total = t_tests + t_boot
    print(f"wilcoxon+holm total: {t_tests:.2f} s")
    print(f"bootstrap ranking total: {t_boot:.2f} s")
    print(f"(not in total) summaries with percentile+BCa CIs, one organ: {t_summary:.2f} s")
    print(f"goal: <= 30 s on 2 cores; ratio to goal: {total / 30.0:.3f}")
    print(f"stats_seconds={total:.3f}")


if __name__ == "__main__":
    main()
