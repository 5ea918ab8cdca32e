"""The classical example segmenter, run in the full sandbox on tiny phantoms, scores well above zero."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import io
from evaluation.labels import LABEL_IDS
from evaluation.metrics import dice
from evaluation.phantoms import generate_cases, write_case
from worker.outputs import check_outputs
from worker.runtime.base import per_case_wall_times

pytestmark = pytest.mark.docker

N_CASES = 3


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    cases = list(generate_cases(N_CASES, size="tiny", seed=0))
    for case in cases:
        write_case(case, root)
    return root, cases


def test_classical_segments_phantoms_in_the_sandbox(harness, example_images, phantoms):
    root, cases = phantoms
    cts = {case.case_id: root / case.case_id / "ct.nii.gz" for case in cases}
    result, output = harness.run(example_images["classical"], cts, time_limit_s=120)
    assert result.failure is None, result.log_tail
    report = check_outputs(output, cts)
    assert report.failure() is None and report.ok_cases == list(cts), report
    # per-case wall time from when each output appeared
    times = per_case_wall_times(result.output_seen_s)
    assert set(times) == set(cts) and all(t > 0 for t in times.values())
    assert sum(times.values()) <= result.duration_s + 0.5

    scores: dict[str, list[float]] = {organ: [] for organ in LABEL_IDS}
    for case in cases:
        predicted = io.read_labels(output / case.case_id, untrusted=True).label_map
        for organ, label_id in LABEL_IDS.items():
            scores[organ].append(dice(predicted == label_id, case.labels == label_id))
    means = {organ: float(np.mean(v)) for organ, v in scores.items()}
    print("classical DSC on tiny phantoms:", {o: round(v, 3) for o, v in means.items()})
    assert all(v > 0.5 for v in means.values()), means
    assert np.mean(list(means.values())) > 0.75, means
