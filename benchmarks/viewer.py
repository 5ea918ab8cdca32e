"""The case viewer's cost on one full-size case, against scoring the same case (the anchor).

A full-size phantom (``evaluation.phantoms``, 512 x 512 x ~300, CT + 9 masks) and a ``realistic``
prediction of it are written once to ``--cache``. Timed in this run, best of ``--repeat``, CPU and
wall seconds:

- ``score``: ``evaluation.scoring.score_case`` of that prediction under ``touchstone`` (the worker's
  per-case work: read truth and prediction, all metrics) -- the anchor;
- ``open``: ``services.web.viewer.load_case`` (CT + truth + prediction decoded through
  ``evaluation.io`` with the scorer's read guards) -- what the first page view of a case costs;
- ``render``: the three PNG slices through the liver's centre from the decoded case -- what a page
  view of a decoded case costs (each slice is cached afterwards).

Usage::

    .venv/bin/python benchmarks/viewer.py [--cache DIR --repeat 3]

Last line: ``open_s=... render3_s=... score_s=... ratio_open_over_score=... ratio_render3_over_score=...``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from evaluation import io, phantoms
from evaluation.scoring import score_case
from services.db.models import Case
from services.web import slices, viewer


def _case(cache: Path) -> tuple[Path, Path]:
    case_dir = cache / "phantom_00000"
    pred_dir = cache / "prediction" / "phantom_00000"
    if not (case_dir / "ct.nii.gz").exists():
        case = next(iter(phantoms.generate_cases(1, size="full")))
        phantoms.write_case(case, cache)
    if not pred_dir.exists():
        truth = io.read_labels(case_dir / "segmentations", untrusted=False)
        labels, affine = phantoms.make_prediction(truth.label_map, truth.geometry.affine, "realistic", seed=1)
        io.write_masks(pred_dir, labels, affine)
    return case_dir, pred_dir


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.process_time() - c, time.perf_counter() - t, out


# the arguments deliberately like benchmarks/evaluation_io.py's: each benchmark is a script run alone.
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "touchstone-bench-viewer")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    case_dir, pred_dir = _case(args.cache)
    print(f"case shape {io.read_nifti(case_dir / 'ct.nii.gz', io.ReadLimits.trusted()).data.shape}, "
          f"load average {os.getloadavg()[0]:.1f}")
    case = Case(case_id="phantom_00000", image_path=str(case_dir / "ct.nii.gz"), labels_path=str(case_dir / "segmentations"))
    place = viewer.PredictionPlace(pred_dir)
    results: dict[str, tuple[float, float]] = {}

    score = [_timed(lambda: score_case("phantom_00000", case_dir / "segmentations", pred_dir, "touchstone"))
             for _ in range(args.repeat)]
    results["score"] = min(r[:2] for r in score)
    opened = [_timed(lambda: viewer.load_case(case, dict(io.LABEL_IDS), place)) for _ in range(args.repeat)]
    results["open"] = min(r[:2] for r in opened)
    loaded = opened[-1][2]
    assert loaded.prediction_note is None, loaded.prediction_note
    volumes = loaded.volumes
    indices = {p: volumes.default_index(p, "liver") for p in slices.PLANES}
    rendered = [_timed(lambda: [volumes.render(p, indices[p]) for p in slices.PLANES]) for _ in range(args.repeat)]
    results["render3"] = min(r[:2] for r in rendered)
    sizes = [len(png) for png in rendered[-1][2]]
    for name, (cpu, wall) in results.items():
        print(f"{name}: {cpu:.3f} CPU s, {wall:.3f} wall s (best of {args.repeat})")
    print(f"PNG sizes {sizes} bytes; load average {os.getloadavg()[0]:.1f}")
    s = results["score"][0]
    print(f"open_s={results['open'][0]:.3f} render3_s={results['render3'][0]:.3f} score_s={s:.3f} "
          f"ratio_open_over_score={results['open'][0] / s:.2f} ratio_render3_over_score={results['render3'][0] / s:.3f}")


if __name__ == "__main__":
    main()
