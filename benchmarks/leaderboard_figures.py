"""The leaderboard page with every algorithm's figures: cold (first request after a statistics
run renders the figures) and warm (figures from the cache of services.web.figures).

1. **Fill** a fresh SQLite database (embedded deployment) with ``--algorithms`` (default 100)
   models in Touchstone's published result format (``dsc.csv``/``nsd.csv`` per model, ``--cases``
   cases, 3 hospitals, age, sex, manufacturer), imported by ``services.importers.import_touchstone``
   and their statistics computed by ``services.leaderboard.recompute_testset`` (``--resamples``
   bootstrap samples: the figures read the stored rows, whatever the resampling settings).
2. **Requests** through the app in process (``fastapi.testclient``: no network in the timing):

   - *anchor*: ``GET /api/v1/leaderboards/bench`` (the cached JSON table the page also reads);
   - *cold*: the first ``GET /leaderboards/bench?organ=liver`` after the statistics run, then its
     five figure SVGs -- what the first visitor waits for;
   - *warm*: the same page, and page + five SVGs, ``--requests`` times each (p50, p99).

Usage::

    .venv/bin/python benchmarks/leaderboard_figures.py [--algorithms 100 --cases 60 --requests 30]

Last line: ``page_warm_p50_ms=... page_and_figures_warm_p50_ms=... page_cold_s=... anchor_api_p50_ms=...
ratio_page_warm_to_anchor=...`` (goal: the warm page of 100 algorithms well under a second).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration" / "leaderboard"))


def _times(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", type=int, default=100)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--resamples", type=int, default=50)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    from conftest import write_metadata, write_touchstone_dir  # the tests' Touchstone-format writer
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    from services.api.app import create_app
    from services.config import Settings
    from services.db import migrate
    from services.db.models import TestSet
    from services.db.session import create_db_engine
    from services.importers import import_touchstone
    from services.leaderboard import StatsOptions, recompute_testset

    with tempfile.TemporaryDirectory(prefix="touchstone-bench-figures-") as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'bench.db'}"
        os.environ["TOUCHSTONE_DATABASE_URL"] = url
        os.environ["TOUCHSTONE_DATA_DIR"] = str(root / "data")
        migrate.upgrade("head", url)
        models = {f"model-{i:03d}": 0.65 + 0.3 * i / args.algorithms for i in range(args.algorithms)}
        start = time.perf_counter()
        engine = create_db_engine(url)
        with Session(engine) as session:
            report = import_touchstone(session, write_touchstone_dir(root / "results", models, n_cases=args.cases),
                                       "bench", metadata=write_metadata(root / "meta.csv", n_cases=args.cases),
                                       recompute=False)
            testset = session.query(TestSet).filter_by(name="bench").one()
            testset.min_group_size = 5
            session.flush()
            print(f"imported {len(report.submission_ids)} models x {args.cases} cases in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            start = time.perf_counter()
            recompute_testset(session, testset, submission_ids=report.submission_ids,
                              options=StatsOptions(n_resamples=args.resamples, group_resamples=20))
            session.commit()
            print(f"statistics in {time.perf_counter() - start:.1f} s", flush=True)
        engine.dispose()

        app = create_app(Settings(database_url=url, data_dir=root / "data"))
        with TestClient(app) as client:
            page_url = "/leaderboards/bench?organ=liver&metric=dsc"
            # the anchor, warmed once (its own cache is per statistics run too)
            assert client.get("/api/v1/leaderboards/bench").status_code == 200
            start = time.perf_counter()
            page = client.get(page_url)
            assert page.status_code == 200
            images = [src.replace("&amp;", "&") for src in re.findall(r'<img class="plot" src="([^"]+)"', page.text)]
            assert len(images) == 5, images
            for src in images:
                assert client.get(src).status_code == 200
            cold = time.perf_counter() - start

            anchor = _times(lambda: client.get("/api/v1/leaderboards/bench"), args.requests)
            warm_page = _times(lambda: client.get(page_url), args.requests)

            def page_and_figures() -> None:
                client.get(page_url)
                for src in images:
                    client.get(src)

            warm_all = _times(page_and_figures, args.requests)
            sizes = sum(len(client.get(src).content) for src in images)

    ms = 1000.0
    print(f"{args.algorithms} algorithms, {args.cases} cases; page {len(page.content) / 1e3:.0f} kB, "
          f"its 5 SVGs {sizes / 1e6:.2f} MB")
    print(f"anchor GET /api/v1/leaderboards/bench  p50={_p(anchor, .5) * ms:8.2f} ms  p99={_p(anchor, .99) * ms:8.2f} ms")
    print(f"page (warm)                           p50={_p(warm_page, .5) * ms:8.2f} ms  p99={_p(warm_page, .99) * ms:8.2f} ms")
    print(f"page + 5 figures (warm)               p50={_p(warm_all, .5) * ms:8.2f} ms  p99={_p(warm_all, .99) * ms:8.2f} ms")
    print(f"page + 5 figures (cold, first after the statistics run): {cold:.2f} s")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"page_warm_p50_ms={_p(warm_page, .5) * ms:.2f} page_and_figures_warm_p50_ms={_p(warm_all, .5) * ms:.2f} "
          f"page_cold_s={cold:.2f} anchor_api_p50_ms={statistics.median(anchor) * ms:.2f} "
          f"ratio_page_warm_to_anchor={_p(warm_page, .5) / statistics.median(anchor):.2f}")


if __name__ == "__main__":
    main()
