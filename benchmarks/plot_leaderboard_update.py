"""Plot the output of ``benchmarks/leaderboard_update.py`` runs: update and full recomputation
against the number of submissions K (the figure in docs/statistics.md).

    .venv/bin/python benchmarks/plot_leaderboard_update.py LOG [LOG ...] --out docs/statistics-leaderboard-update.svg

Each LOG is the whole output of one run; its last line
``update_seconds=... full_seconds=... submissions=K cases=N`` gives the point.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAST_LINE = re.compile(r"update_seconds=([\d.]+) full_seconds=([\d.]+) submissions=(\d+) cases=(\d+)")


def points(logs: list[Path]) -> list[tuple[int, float, float, int]]:
    """(K, update s, full s, cases) per log, sorted by K."""
    out = []
    for log in logs:
        found = LAST_LINE.findall(log.read_text())
        if not found:
            raise SystemExit(f"{log}: no 'update_seconds=... full_seconds=...' line (did the run finish?)")
        update, full, k, cases = found[-1]
        out.append((int(k), float(update), float(full), int(cases)))
    return sorted(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = points(args.logs)
    ks = [p[0] for p in data]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(ks, [p[2] for p in data], "o-", label="full recomputation (every pair re-tested)")
    ax.plot(ks, [p[1] for p in data], "o-", label="incremental update (new pairs only)")
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="goal: update ≤ 10 s")
    for k, update, full, _ in data:
        ax.annotate(f"{update:.1f} s", (k, update), textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.annotate(f"{full:.0f} s", (k, full), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("published submissions K (then the (K+1)-th is scored)")
    ax.set_ylabel("seconds")
    ax.set_xticks(ks)
    ax.set_title(f"benchmarks/leaderboard_update.py, {data[0][3]:,} cases, PostgreSQL", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"K={k}: {u:.2f} / {f:.2f} s" for k, u, f, _ in data))


if __name__ == "__main__":
    main()
