"""Speed of lesion-wise scoring on one full-size tumour case: ours vs panoptica on the same masks.

    .venv/bin/python benchmarks/lesions.py [--repeats N] [--rebuild]

Builds (once, cached under ``benchmarks/.cache/``) a full-size tumour phantom
(``evaluation.phantoms``, 512×512×~300, ``lesions=True``, the first case of seed 0 with at least
four lesions) and an imperfect prediction of it: ``make_prediction(kind="miss_small_lesions")``
(lesions under 400 voxels missed, the others grown by a voxel), then ``kind="realistic"`` (every
class shifted by up to a voxel, eroded or dilated, false positives now and then).

Timed on the same in-memory label maps (reading excluded), for each lesion class of the
``touchstone-lesions`` protocol (liver, kidney, pancreatic lesions):

* ours: the class masks (``labels == id``) and :func:`evaluation.lesions.evaluate_lesions`
  (26-connected components, one-to-one matching at IoU > 0, every lesion metric and per-lesion
  record);
* the anchor, panoptica: ``Panoptica_Evaluator(InputType.SEMANTIC,
  ConnectedComponentsInstanceApproximator(cc3d), NaiveThresholdMatching(Metric.IOU, 0,
  strict_threshold=True), instance_metrics=[DSC, IOU], global_metrics=[DSC])`` on the same class
  masks (``uint8``), the same work plus panoptica's global DSC.

Best of ``--repeats`` runs each. The last line is exactly
``ratio_vs_panoptica=<float> ours_s=<float> panoptica_s=<float> lesions=<int> max_abs_diff=<float>``:
ratio = panoptica seconds / our seconds for the three lesion classes of the case, and the largest
difference between the two on TP/FP/FN, sensitivity, precision, F1, PQ and per-lesion DSC.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.lesions import evaluate_lesions  # noqa: E402
from evaluation.protocols import load_protocol  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
CACHE_FILE = CACHE / "lesions_case_v1.npz"


def _build() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    from evaluation.labels import LESION_LABEL_IDS
    from evaluation.phantoms import generate_cases, make_prediction

    for case in generate_cases(6, size="full", seed=0, lesions=True):
        n = sum(int(case.metadata[f"n_{name}"]) for name in LESION_LABEL_IDS)
        print(f"  {case.case_id}: {n} lesion(s) {case.metadata['shape']}", flush=True)
        if n >= 4:
            break
    pred, _ = make_prediction(case.labels, case.affine, "miss_small_lesions", min_lesion_voxels=400)
    pred, _ = make_prediction(pred, case.affine, "realistic", seed=1)
    return case.labels, pred, case.spacing


def load_case(rebuild: bool) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    if CACHE_FILE.exists() and not rebuild:
        data = np.load(CACHE_FILE)
        return data["gt"], data["pred"], tuple(float(v) for v in data["spacing"])  # type: ignore[return-value]
    print("building the full-size tumour case (once) ...", flush=True)
    gt, pred, spacing = _build()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(CACHE_FILE, gt=gt, pred=pred, spacing=np.asarray(spacing))
    return gt, pred, spacing


def _panoptica_evaluator():
    from panoptica import CCABackend, ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator
    from panoptica.metrics import Metric

    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),
        instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=0.0, strict_threshold=True),
        instance_metrics=[Metric.DSC, Metric.IOU], global_metrics=[Metric.DSC], verbose=False,
    )


def _panoptica_values(r) -> dict[str, float]:
    nan = math.nan
    return {
        "lesion_tp": r.tp, "lesion_fp": r.fp, "lesion_fn": r.fn, "lesion_f1": r.rq, "lesion_pq": r.pq,
        "lesion_sensitivity": r.rec if r.n_ref_instances else nan,
        "lesion_precision": r.prec if r.n_pred_instances else nan,
        "lesion_dsc": (r.sq_dsc * r.tp / r.n_ref_instances) if r.tp else (0.0 if r.n_ref_instances else nan),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()

    gt, pred, spacing = load_case(args.rebuild)
    protocol = load_protocol("touchstone-lesions")
    matching = protocol.lesion_matching.to_matching()
    print(f"case {gt.shape} at {tuple(round(s, 3) for s in spacing)} mm; protocol {protocol.key}, {matching.rule}, "
          f"{matching.connectivity}-connectivity")

    def ours():
        return {name: evaluate_lesions(pred == i, gt == i, spacing, matching) for name, i in protocol.lesions.items()}

    evaluator = _panoptica_evaluator()

    def theirs():
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, i in protocol.lesions.items():
                p, g = (pred == i).astype(np.uint8), (gt == i).astype(np.uint8)
                out[name] = evaluator.evaluate(p, g, verbose=False)["ungrouped"]
        return out

    def best(fn):
        times, result = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return min(times), result

    theirs()  # panoptica prints its banner once; not timed
    t_ours, mine = best(ours)
    t_theirs, oracle = best(theirs)
    max_diff = 0.0
    n_lesions = 0
    print(f"{'class':18} {'truth':>5} {'pred':>5} {'TP':>4} {'FP':>4} {'FN':>4} {'sens':>6} {'F1':>6} {'lesDSC':>6} {'PQ':>6}")
    for name in protocol.lesions:
        m = mine[name].metrics
        ref = _panoptica_values(oracle[name])
        n_truth = int(m["lesion_tp"] + m["lesion_fn"])
        n_lesions += n_truth
        print(f"{name:18} {n_truth:5d} {int(m['lesion_tp'] + m['lesion_fp']):5d} {int(m['lesion_tp']):4d} "
              f"{int(m['lesion_fp']):4d} {int(m['lesion_fn']):4d} {m['lesion_sensitivity']:6.3f} {m['lesion_f1']:6.3f} "
              f"{m['lesion_dsc']:6.3f} {m['lesion_pq']:6.3f}")
        for k, v in ref.items():
            a, b = float(m[k]), float(v)
            if math.isnan(a) and math.isnan(b):
                continue
            max_diff = max(max_diff, abs(a - b) if not (math.isnan(a) or math.isnan(b)) else math.inf)
    print(f"ours {t_ours:.3f} s, panoptica {t_theirs:.3f} s for the {len(protocol.lesions)} lesion classes (best of {args.repeats})")
    print(f"ratio_vs_panoptica={t_theirs / t_ours:.3f} ours_s={t_ours:.4f} panoptica_s={t_theirs:.4f} "
          f"lesions={n_lesions} max_abs_diff={max_diff:.3g}")


if __name__ == "__main__":
    main()
