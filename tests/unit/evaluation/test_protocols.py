"""Protocols: presets, serialisation round trips, immutability, load errors."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import yaml

from evaluation.labels import LABEL_IDS
from evaluation.protocols import PRESETS, Protocol, list_presets, load_protocol

FLARE22_MM = {
    "liver": 5.0,
    "kidney_left": 3.0,
    "kidney_right": 3.0,
    "spleen": 3.0,
    "pancreas": 5.0,
    "aorta": 2.0,
    "postcava": 2.0,
    "gall_bladder": 2.0,
    "stomach": 5.0,
}


def test_presets_listed_and_loadable():
    assert list_presets() == ["nsd-deepmind", "touchstone", "touchstone-lesions"]
    assert set(PRESETS) == {"nsd-deepmind", "touchstone", "touchstone-lesions"}
    for name in list_presets():
        p = load_protocol(name)
        assert p is PRESETS[name]
        assert p.key == f"{name}@1"
        assert p.organs == LABEL_IDS


def test_touchstone_preset_reproduces_published_evaluation():
    p = load_protocol("touchstone")
    assert p.surface == "voxel"
    assert p.dsc_variant == "touchstone"
    assert p.metrics == ("dsc", "nsd")
    assert p.nsd_tolerance_mm == {organ: 1.5 for organ in LABEL_IDS}
    # organs absent from the ground truth were skipped (NaN) by Touchstone
    assert all(math.isnan(v) for v in p.empty.gt_empty.values())
    assert all(math.isnan(v) for v in p.empty.both_empty.values())
    assert p.empty.pred_empty["dsc"] == 0.0 and p.empty.pred_empty["nsd"] == 0.0
    assert p.worst["dsc"] == 0.0 and p.worst["nsd"] == 0.0


def test_nsd_deepmind_preset_uses_flare22_tolerances_and_surfels():
    p = load_protocol("nsd-deepmind")
    assert p.surface == "surfel"
    assert p.dsc_variant == "standard"
    assert p.metrics == ("dsc", "nsd", "hd95", "assd")
    assert p.nsd_tolerance_mm == FLARE22_MM
    assert p.empty.both_empty == {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0, "assd": 0.0}
    assert p.empty.pred_empty["hd95"] == math.inf


@pytest.mark.parametrize("name", ["touchstone", "nsd-deepmind", "touchstone-lesions"])
def test_round_trip_json_and_yaml_keep_content_hash(name, tmp_path):
    p = load_protocol(name)
    from_json = Protocol.model_validate_json(p.to_json())
    from_yaml = Protocol.model_validate(yaml.safe_load(p.to_yaml()))
    assert from_json.content_hash == p.content_hash
    assert from_yaml.content_hash == p.content_hash
    (tmp_path / "p.json").write_text(p.to_json())
    (tmp_path / "p.yaml").write_text(p.to_yaml())
    assert load_protocol(tmp_path / "p.json").content_hash == p.content_hash
    assert load_protocol(str(tmp_path / "p.yaml")).content_hash == p.content_hash


def test_content_hash_is_stable_and_changes_with_any_field():
    p = load_protocol("nsd-deepmind")
    assert len(p.content_hash) == 64
    assert Protocol.model_validate(p.to_dict()).content_hash == p.content_hash
    tol = dict(p.nsd_tolerance_mm, liver=4.0)
    changed = Protocol.model_validate({**p.to_dict(), "nsd_tolerance_mm": tol})
    assert changed.content_hash != p.content_hash
    bumped = Protocol.model_validate({**p.to_dict(), "version": 2})
    assert bumped.content_hash != p.content_hash and bumped.key == "nsd-deepmind@2"


def test_protocol_is_immutable():
    p = load_protocol("touchstone")
    with pytest.raises(pydantic.ValidationError):
        p.version = 2
    with pytest.raises(pydantic.ValidationError):
        p.surface = "surfel"


def test_metrics_are_validated_and_ordered():
    data = load_protocol("nsd-deepmind").to_dict()
    p = Protocol.model_validate({**data, "metrics": ["assd", "dsc"]})
    assert p.metrics == ("dsc", "assd")
    with pytest.raises(pydantic.ValidationError, match="unknown metrics"):
        Protocol.model_validate({**data, "metrics": ["dice"]})


def test_nsd_needs_a_tolerance_for_every_organ():
    data = load_protocol("touchstone").to_dict()
    tol = dict(data["nsd_tolerance_mm"])
    del tol["liver"]
    with pytest.raises(pydantic.ValidationError, match="liver"):
        Protocol.model_validate({**data, "nsd_tolerance_mm": tol})


def test_empty_rules_need_every_enabled_metric():
    data = load_protocol("touchstone").to_dict()
    data = {**data, "metrics": ["dsc", "nsd", "hd95"]}
    data["empty"] = {**data["empty"], "pred_empty": {"dsc": 0.0, "nsd": 0.0}}
    with pytest.raises(pydantic.ValidationError, match="empty.pred_empty needs a value for metrics"):
        Protocol.model_validate(data)


def test_load_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="unknown protocol 'flare'.*touchstone"):
        load_protocol("flare")


def test_load_missing_file_says_so(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_protocol(tmp_path / "nope.yaml")


def test_load_broken_yaml_and_json(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="cannot be read"):
        load_protocol(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        load_protocol(bad_json)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_protocol(not_mapping)


def test_load_invalid_fields_names_the_field_and_the_fix(tmp_path):
    data = load_protocol("touchstone").to_dict()
    data["surface"] = "mesh"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"surface.*fix those fields"):
        load_protocol(path)



# --------------------------------------------------------------------------------------------
# lesion protocols
# --------------------------------------------------------------------------------------------
def test_lesion_preset_label_table_and_metrics():
    from evaluation.labels import LESION_LABEL_IDS
    from evaluation.metric_registry import LESION_METRICS

    p = load_protocol("touchstone-lesions")
    assert p.kind == "lesion" and p.lesions == LESION_LABEL_IDS
    assert p.labels == {**LABEL_IDS, **LESION_LABEL_IDS} and p.classes == (*LABEL_IDS, *LESION_LABEL_IDS)
    assert p.organ_metrics == ("dsc", "nsd") and p.lesion_metrics == LESION_METRICS
    assert p.lesion_matching.to_matching().rule == "IoU > 0" and p.lesion_matching.connectivity == 26
    view = p.mask_protocol  # what evaluation.metrics scores: every class, organ metrics only
    assert view.kind == "organ" and view.organs == p.labels and view.metrics == ("dsc", "nsd")
    assert load_protocol("touchstone").mask_protocol is load_protocol("touchstone")


def test_organ_protocol_yaml_and_hash_do_not_carry_lesion_fields():
    p = load_protocol("touchstone")
    assert "kind" not in yaml.safe_load(p.to_yaml()) and "lesions" not in yaml.safe_load(p.to_yaml())
    # the hash of an organ protocol is the hash of its fields without the lesion-only ones
    import hashlib

    data = {k: v for k, v in p.to_dict().items() if k not in ("kind", "lesions", "lesion_matching")}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    assert p.content_hash == hashlib.sha256(canonical.encode()).hexdigest()


def test_lesion_matching_is_part_of_the_content_hash():
    p = load_protocol("touchstone-lesions")
    data = p.to_dict()
    half = Protocol.model_validate({**data, "lesion_matching": {"iou_threshold": 0.5, "strict": False}})
    assert half.content_hash != p.content_hash and half.lesion_matching.to_matching().rule == "IoU ≥ 0.5"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "organ"}, "only allowed in a kind: lesion"),
        ({"lesions": {}}, "needs lesions"),
        ({"lesions": {"liver_lesion": 5}}, "distinct names and label ids"),
        ({"lesions": {"liver": 20}}, "distinct names and label ids"),
        ({"metrics": ["lesion_f1"]}, "at least one of"),
        ({"lesion_matching": {"connectivity": 8}}, "connectivity"),
        ({"lesion_matching": {"iou_threshold": 1.5}}, "iou_threshold"),
        ({"worst": {"dsc": 0.0, "nsd": 0.0}}, "worst needs a value for metrics"),
        ({"empty": {"both_empty": {"dsc": 0.0, "nsd": 0.0, "lesion_f1": 0.0}, "pred_empty": {"dsc": 0.0, "nsd": 0.0}, "gt_empty": {"dsc": 0.0, "nsd": 0.0}}}, "unknown metrics"),
    ],
)
def test_lesion_protocol_fields_are_validated(change, message):
    data = {**load_protocol("touchstone-lesions").to_dict(), **change}
    with pytest.raises(pydantic.ValidationError, match=message):
        Protocol.model_validate(data)


def test_lesion_metrics_need_a_lesion_protocol():
    data = load_protocol("touchstone").to_dict()
    with pytest.raises(pydantic.ValidationError, match="need kind: lesion"):
        Protocol.model_validate({**data, "metrics": ["dsc", "lesion_f1"], "worst": {**data["worst"], "lesion_f1": 0.0}})


def test_a_deeply_nested_protocol_file_is_refused_with_a_clear_error(tmp_path):
    """A hostile organizer file (20,000 nested lists, 40 KB) gives a ValueError naming the problem,
    not a RecursionError (the API would answer 500)."""
    for suffix, text in ((".yaml", "worst: " + "[" * 20000 + "]" * 20000 + "\n"),
                         (".json", '{"worst": ' + "[" * 20000 + "]" * 20000 + "}")):
        path = tmp_path / f"deep{suffix}"
        path.write_text(text)
        with pytest.raises(ValueError, match="nested too deeply"):
            load_protocol(path)
