"""Tumour phantoms: lesions inside their organs, several per organ, sizes from mm to cm, some cases
without any, HU by contrast phase, and the anatomy unchanged by them."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import io
from evaluation.labels import LABEL_IDS, LESION_HOSTS, LESION_LABEL_IDS
from evaluation.lesions import connected_components
from evaluation.manifest import read_manifest
from evaluation.phantoms import LESION_HU, generate_cases, make_prediction, write_phantom_set


@pytest.fixture(scope="module")
def tumour_cases():
    return list(generate_cases(10, size="small", seed=2, lesions=True))


def test_lesions_lie_in_their_organs_and_are_counted(tumour_cases):
    organ_grown = {}
    for case in tumour_cases:
        for name, label_id in LESION_LABEL_IDS.items():
            mask = case.labels == label_id
            _, n = connected_components(mask)
            assert case.metadata[f"n_{name}"] == n
            if not mask.any():
                continue
            # every lesion voxel touches its host organ or another lesion voxel (it was carved out of it)
            from scipy import ndimage

            hosts = np.isin(case.labels, [LABEL_IDS[h] for h in LESION_HOSTS[name]])
            cc, n = connected_components(mask)
            near = ndimage.binary_dilation(hosts, iterations=2)
            assert set(np.unique(cc[near & mask]).tolist()) == set(range(1, n + 1)), (case.case_id, name)
            organ_grown[name] = True
    assert set(organ_grown) == set(LESION_LABEL_IDS)


def test_several_per_organ_some_cases_without_any_and_a_range_of_sizes(tumour_cases):
    counts = [sum(c.metadata[f"n_{n}"] for n in LESION_LABEL_IDS) for c in tumour_cases]
    assert 0 in counts and max(counts) >= 3
    assert max(c.metadata["n_liver_lesion"] for c in tumour_cases) >= 2
    diameters = []
    for case in tumour_cases:
        voxel = float(np.prod(case.spacing))
        for label_id in LESION_LABEL_IDS.values():
            cc, n = connected_components(case.labels == label_id)
            sizes = np.bincount(cc.ravel())[1:]
            diameters += [float((6 * s * voxel / np.pi) ** (1 / 3)) for s in sizes]
    assert min(diameters) < 8.0 and max(diameters) > 25.0  # a few mm to several cm


def test_anatomy_is_the_same_with_and_without_lesions():
    plain = list(generate_cases(3, size="tiny", seed=2))
    tumour = list(generate_cases(3, size="tiny", seed=2, lesions=True))
    for a, b in zip(plain, tumour):
        lesion = b.labels >= min(LESION_LABEL_IDS.values())
        assert np.array_equal(a.labels[~lesion], b.labels[~lesion])
        assert a.metadata["contrast_phase"] == b.metadata["contrast_phase"]
        assert "n_liver_lesion" in b.metadata and "n_liver_lesion" not in a.metadata


def test_lesion_contrast_follows_the_phase(tumour_cases):
    by_phase: dict[str, list[float]] = {}
    for case in tumour_cases:
        lesion = case.labels == LESION_LABEL_IDS["liver_lesion"]
        if lesion.sum() < 30:
            continue
        liver = case.labels == LABEL_IDS["liver"]
        by_phase.setdefault(str(case.metadata["contrast_phase"]), []).append(
            float(np.median(case.ct[lesion]) - np.median(case.ct[liver]))
        )
    assert by_phase
    for phase, diffs in by_phase.items():
        # the sign of the lesion-to-liver contrast is the table's (noise is averaged out by the median)
        from evaluation.phantoms import ORGAN_HU

        expected = LESION_HU["liver_lesion"][phase] - ORGAN_HU["liver"][phase]
        assert all(np.sign(d) == np.sign(expected) for d in diffs), (phase, diffs, expected)


def test_tumour_set_on_disk_has_lesion_masks_and_counts(tmp_path):
    manifest = write_phantom_set(tmp_path, 2, size="tiny", seed=1, lesions=True)
    rows = read_manifest(manifest).rows
    assert all(f"n_{n}" in rows[0].extras for n in LESION_LABEL_IDS)
    case_dir = tmp_path / rows[0].case_id
    labels = io.read_labels(case_dir, {**LABEL_IDS, **LESION_LABEL_IDS}, untrusted=True)
    assert set(np.unique(labels.label_map)) <= {0, *LABEL_IDS.values(), *LESION_LABEL_IDS.values()}
    for name in LESION_LABEL_IDS:
        assert (case_dir / "segmentations" / f"{name}.nii.gz").exists()


def test_miss_small_lesions_keeps_big_lesions_and_drops_small_ones(tumour_cases):
    case = max(tumour_cases, key=lambda c: c.metadata["n_liver_lesion"])
    label_id = LESION_LABEL_IDS["liver_lesion"]
    pred, _ = make_prediction(case.labels, case.affine, "miss_small_lesions", min_lesion_voxels=50)
    cc, n = connected_components(case.labels == label_id)
    sizes = np.bincount(cc.ravel())
    for k in range(1, n + 1):
        found = (pred[cc == k] == label_id).all()
        assert found == (sizes[k] >= 50), (k, sizes[k])
    # dropped lesions become liver, not background
    assert ((pred == LABEL_IDS["liver"]) | (pred == label_id))[case.labels == label_id].all()
