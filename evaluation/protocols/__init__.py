"""Evaluation protocols: named, versioned, immutable descriptions of how a test set is scored.

A :class:`Protocol` fixes the organs and their label ids, the metrics, the surface definition, the
NSD tolerance per organ, the DSC variant, the value of each metric when a mask is empty, and the
score of a missing or invalid prediction. Every stored score names ``protocol.key``
(``"name@version"``) and may keep ``protocol.content_hash``, so a changed protocol is a new version
and stored predictions can be re-scored without re-running inference.

Presets live next to this file as YAML (``touchstone.yaml``, ``nsd-deepmind.yaml``); any JSON or
YAML file with the same fields is a protocol too (:func:`load_protocol`).
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evaluation.labels import LABEL_IDS

__all__ = ["METRICS", "PRESETS", "EmptyMaskRules", "Protocol", "list_presets", "load_protocol"]

#: every metric a protocol may enable, in canonical order
METRICS: tuple[str, ...] = ("dsc", "nsd", "hd95", "assd")

_PRESET_DIR = Path(__file__).resolve().parent

_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants", allow_inf_nan=True)


class EmptyMaskRules(BaseModel):
    """The value of each metric when a mask is empty (no metric is computed then).

    ``nan`` means "not scored": the organ is left out of the aggregates for that case.
    """

    model_config = _MODEL_CONFIG

    both_empty: dict[str, float] = Field(description="prediction and ground truth both empty")
    pred_empty: dict[str, float] = Field(description="prediction empty, ground truth not (a missed organ)")
    gt_empty: dict[str, float] = Field(description="ground truth empty, prediction not (a false positive)")


class Protocol(BaseModel):
    """How a test set is scored. Immutable; change a field and you have a new ``version``.

    Fields:
        name: short identifier, e.g. ``"touchstone"``.
        version: positive integer; bump it whenever anything below changes.
        organs: organ → voxel value in a combined label map (default: the Touchstone label set).
        metrics: subset of ``("dsc", "nsd", "hd95", "assd")``, kept in that order.
        surface: ``"voxel"`` (MONAI default voxel-boundary surfaces) or ``"surfel"`` (DeepMind
            surface elements with areas); used by NSD, HD95 and ASSD.
        nsd_tolerance_mm: organ → NSD tolerance τ in mm (every organ needs one when NSD is on).
        dsc_variant: ``"standard"`` 2|P∩G|/(|P|+|G|) or ``"touchstone"`` 2|P∩G|/(|P|+|G|+1).
        empty: :class:`EmptyMaskRules`, one value per enabled metric in each situation.
        worst: metric → score of a missing, unreadable or invalid prediction.
        organ_average: how the per-case organ average is formed -- ``"scored-organs"`` (mean of
            the organs scored for the case) or ``"all-organs"`` (a case counts only when every
            organ present in its ground truth has a score; Touchstone's leaderboard). Aggregation
            only: per-case scores do not depend on it.
        description: free text shown to people.
    """

    model_config = _MODEL_CONFIG

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: int = Field(ge=1)
    description: str = ""
    organs: dict[str, int] = Field(default_factory=lambda: dict(LABEL_IDS))
    metrics: tuple[str, ...] = ("dsc", "nsd")
    surface: Literal["voxel", "surfel"] = "voxel"
    nsd_tolerance_mm: dict[str, float] = Field(default_factory=dict)
    dsc_variant: Literal["standard", "touchstone"] = "standard"
    empty: EmptyMaskRules
    worst: dict[str, float]
    organ_average: Literal["scored-organs", "all-organs"] = "scored-organs"

    @field_validator("organs")
    @classmethod
    def _check_organs(cls, organs: dict[str, int]) -> dict[str, int]:
        if not organs:
            raise ValueError("organs must name at least one organ")
        ids = list(organs.values())
        if any(i <= 0 for i in ids):
            raise ValueError(f"organ label ids must be positive integers (0 is background), got {organs}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"organ label ids must be distinct, got {organs}")
        return organs

    @field_validator("metrics", mode="before")
    @classmethod
    def _check_metrics(cls, metrics: Any) -> tuple[str, ...]:
        if isinstance(metrics, str):
            metrics = [metrics]
        metrics = list(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
        if not metrics:
            raise ValueError(f"metrics must list at least one of {list(METRICS)}")
        return tuple(m for m in METRICS if m in metrics)

    @model_validator(mode="after")
    def _check_consistency(self) -> Protocol:
        if "nsd" in self.metrics:
            missing = [o for o in self.organs if o not in self.nsd_tolerance_mm]
            if missing:
                raise ValueError(f"nsd_tolerance_mm has no tolerance for organs {missing}")
        extra = [o for o in self.nsd_tolerance_mm if o not in self.organs]
        if extra:
            raise ValueError(f"nsd_tolerance_mm names organs that are not in organs: {extra}")
        bad = {o: t for o, t in self.nsd_tolerance_mm.items() if not (math.isfinite(t) and t >= 0)}
        if bad:
            raise ValueError(f"NSD tolerances must be finite and >= 0 mm, got {bad}")
        for where, values in (
            ("empty.both_empty", self.empty.both_empty),
            ("empty.pred_empty", self.empty.pred_empty),
            ("empty.gt_empty", self.empty.gt_empty),
            ("worst", self.worst),
        ):
            missing = [m for m in self.metrics if m not in values]
            if missing:
                raise ValueError(f"{where} needs a value for metrics {missing}")
            unknown = [m for m in values if m not in METRICS]
            if unknown:
                raise ValueError(f"{where} names unknown metrics {unknown}; choose from {list(METRICS)}")
        return self

    @property
    def key(self) -> str:
        """``"name@version"``: what every stored score names."""
        return f"{self.name}@{self.version}"

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of every field: equal hashes mean equal scoring."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (NaN and inf stay floats)."""
        return self.model_dump(mode="python")

    def to_json(self) -> str:
        """JSON text; NaN and inf are written as ``NaN`` / ``Infinity`` (Python's json reads them)."""
        return self.model_dump_json(indent=2)

    def to_yaml(self) -> str:
        """YAML text (``.nan`` / ``.inf`` for NaN and inf)."""
        data = self.to_dict()
        data["metrics"] = list(data["metrics"])
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        return cls.model_validate(data)


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"protocol file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def _load_preset(name: str) -> Protocol:
    return Protocol.model_validate(_read_file(_PRESET_DIR / f"{name}.yaml"))


def list_presets() -> list[str]:
    """Names of the built-in protocols."""
    return sorted(p.stem for p in _PRESET_DIR.glob("*.yaml"))


#: built-in protocols by name
PRESETS: dict[str, Protocol] = {name: _load_preset(name) for name in list_presets()}


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A preset by name (``"touchstone"``, ``"nsd-deepmind"``) or a protocol from a JSON/YAML file.

    Raises ``ValueError`` naming the problem and the fix for an unknown name, a missing or
    unreadable file, or invalid fields.
    """
    if isinstance(name_or_path, Protocol):
        return name_or_path
    text = str(name_or_path)
    if isinstance(name_or_path, str) and text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    looks_like_file = path.suffix.lower() in {".json", ".yaml", ".yml"} or path.exists() or "/" in text
    if not looks_like_file:
        raise ValueError(
            f"unknown protocol {text!r}: use a preset ({', '.join(PRESETS)}) or the path of a .yaml/.json protocol file"
        )
    if not path.is_file():
        raise ValueError(
            f"protocol file {text!r} does not exist: give an existing .yaml/.json file or a preset ({', '.join(PRESETS)})"
        )
    try:
        data = _read_file(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"protocol file {text!r} cannot be read as {path.suffix or 'YAML'}: {exc}") from None
    try:
        return Protocol.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(
            f"protocol file {text!r} is not a valid protocol ({problems}); "
            "fix those fields (see docs/evaluation-metrics.md or a preset's YAML)"
        ) from None
