"""Evaluation protocols: named, versioned, immutable descriptions of how a test set is scored.

A :class:`Protocol` fixes the organs and their label ids, the metrics, the surface definition, the
NSD tolerance per organ, the DSC variant, the value of each metric when a mask is empty, and the
score of a missing or invalid prediction. Every stored score names ``protocol.key``
(``"name@version"``) and may keep ``protocol.content_hash``, so a changed protocol is a new version
and stored predictions can be re-scored without re-running inference.

Two kinds: ``kind: organ`` (the default) scores every class of ``organs`` with the organ metrics;
``kind: lesion`` adds a table of lesion classes (``lesions``: e.g. liver, kidney and pancreas tumour
labels beside the organs) scored with the organ metrics on the whole class mask *and* the lesion
metrics of :mod:`evaluation.lesions` on its connected components, found and matched as
``lesion_matching`` says.

Presets live next to this file as YAML (``touchstone.yaml``, ``nsd-deepmind.yaml``,
``touchstone-lesions.yaml``); any JSON or YAML file with the same fields is a protocol too
(:func:`load_protocol`).
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
from evaluation.lesions import CONNECTIVITIES, LesionMatching
from evaluation.metric_registry import LESION_METRICS, METRICS, ORGAN_METRICS

__all__ = ["METRICS", "PRESETS", "EmptyMaskRules", "LesionMatchingRule", "Protocol", "list_presets", "load_protocol"]

#: fields that only a ``kind: lesion`` protocol has; left out of an organ protocol's content hash
#: so the hashes stored before lesion protocols existed still match
_LESION_FIELDS = ("kind", "lesions", "lesion_matching")

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


class LesionMatchingRule(BaseModel):
    """How lesions are found and matched (:class:`evaluation.lesions.LesionMatching`).

    ``connectivity``: 6, 18 or 26 (face; face or edge; face, edge or corner neighbours).
    A truth and a predicted component match when ``IoU > iou_threshold`` (``strict``, the default)
    or ``IoU >= iou_threshold``; greedy in decreasing IoU, one-to-one.
    """

    model_config = _MODEL_CONFIG

    connectivity: int = 26
    iou_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    strict: bool = True

    @field_validator("connectivity")
    @classmethod
    def _check_connectivity(cls, value: int) -> int:
        if value not in CONNECTIVITIES:
            raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITIES)}, got {value}")
        return value

    def to_matching(self) -> LesionMatching:
        return LesionMatching(connectivity=self.connectivity, iou_threshold=self.iou_threshold, strict=self.strict)


class Protocol(BaseModel):
    """How a test set is scored. Immutable; change a field and you have a new ``version``.

    Fields:
        name: short identifier, e.g. ``"touchstone"``.
        version: positive integer; bump it whenever anything below changes.
        organs: organ → voxel value in a combined label map (default: the Touchstone label set).
        metrics: subset of :data:`evaluation.metric_registry.METRICS` (organ metrics ``dsc``,
            ``nsd``, ``hd95``, ``assd``; lesion metrics only in a lesion protocol), kept in that order.
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
        kind: ``"organ"`` or ``"lesion"``.
        lesions: lesion class → voxel value (``kind: lesion`` only; distinct from the organ ids).
            Each lesion class is scored with the protocol's organ metrics on its whole mask (it
            needs an NSD tolerance and its rows follow the organs') and with the lesion metrics.
        lesion_matching: :class:`LesionMatchingRule` (``kind: lesion`` only).

    ``metrics`` of a lesion protocol may also name lesion metrics (``lesion_f1``, ...: see
    :mod:`evaluation.metric_registry`); their empty-case values are fixed by
    :mod:`evaluation.lesions`, so ``empty`` names only organ metrics, while ``worst`` (a failed
    prediction) names every enabled metric.
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
    kind: Literal["organ", "lesion"] = "organ"
    lesions: dict[str, int] = Field(default_factory=dict)
    lesion_matching: LesionMatchingRule = Field(default_factory=LesionMatchingRule)

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
        if self.kind == "lesion":
            if not self.lesions:
                raise ValueError("a kind: lesion protocol needs lesions: {lesion class: label id, ...}")
            if any(i <= 0 for i in self.lesions.values()):
                raise ValueError(f"lesion label ids must be positive integers (0 is background), got {self.lesions}")
            shared = sorted(set(self.lesions) & set(self.organs))
            ids = list(self.organs.values()) + list(self.lesions.values())
            if shared or len(set(ids)) != len(ids):
                raise ValueError(f"organs and lesions must have distinct names and label ids, got {self.organs} and {self.lesions}")
            if not self.organ_metrics:
                raise ValueError(f"a kind: lesion protocol needs at least one of {list(ORGAN_METRICS)} in metrics "
                                 "(the case-level score of each class)")
        else:
            if self.lesions:
                raise ValueError("lesions are only allowed in a kind: lesion protocol; add kind: lesion")
            lesion_metrics = [m for m in self.metrics if m in LESION_METRICS]
            if lesion_metrics:
                raise ValueError(f"lesion metrics {lesion_metrics} need kind: lesion and a lesions table")
            if self.lesion_matching != LesionMatchingRule():
                raise ValueError("lesion_matching is only allowed in a kind: lesion protocol; add kind: lesion")
        if "nsd" in self.metrics:
            missing = [o for o in self.classes if o not in self.nsd_tolerance_mm]
            if missing:
                raise ValueError(f"nsd_tolerance_mm has no tolerance for organs {missing}")
        extra = [o for o in self.nsd_tolerance_mm if o not in self.classes]
        if extra:
            raise ValueError(f"nsd_tolerance_mm names organs that are not in organs: {extra}")
        bad = {o: t for o, t in self.nsd_tolerance_mm.items() if not (math.isfinite(t) and t >= 0)}
        if bad:
            raise ValueError(f"NSD tolerances must be finite and >= 0 mm, got {bad}")
        for where, values, allowed in (
            ("empty.both_empty", self.empty.both_empty, ORGAN_METRICS),
            ("empty.pred_empty", self.empty.pred_empty, ORGAN_METRICS),
            ("empty.gt_empty", self.empty.gt_empty, ORGAN_METRICS),
            ("worst", self.worst, METRICS),
        ):
            missing = [m for m in self.metrics if m in allowed and m not in values]
            if missing:
                raise ValueError(f"{where} needs a value for metrics {missing}")
            unknown = [m for m in values if m not in allowed]
            if unknown:
                raise ValueError(f"{where} names unknown metrics {unknown}; choose from {list(allowed)}")
        return self

    @property
    def classes(self) -> tuple[str, ...]:
        """Every scored class, in row order: the organs, then the lesion classes."""
        return (*self.organs, *self.lesions)

    @property
    def labels(self) -> dict[str, int]:
        """The label table: class → voxel value, organs then lesion classes."""
        return {**self.organs, **self.lesions}

    @property
    def organ_metrics(self) -> tuple[str, ...]:
        """The enabled metrics computed on whole class masks (every class)."""
        return tuple(m for m in self.metrics if m in ORGAN_METRICS)

    @property
    def lesion_metrics(self) -> tuple[str, ...]:
        """The enabled lesion metrics (lesion classes only)."""
        return tuple(m for m in self.metrics if m in LESION_METRICS)

    @cached_property
    def mask_protocol(self) -> Protocol:
        """The organ-kind view of this protocol that :mod:`evaluation.metrics` scores: every class
        of the label table (organs and lesion classes) with the organ metrics. An organ protocol
        is its own view."""
        if self.kind == "organ":
            return self
        data = self.to_dict()
        data.update(
            organs=self.labels, metrics=list(self.organ_metrics), kind="organ", lesions={},
            lesion_matching=LesionMatchingRule().model_dump(),
            worst={m: v for m, v in self.worst.items() if m in ORGAN_METRICS},
        )
        return Protocol.model_validate(data)

    @property
    def key(self) -> str:
        """``"name@version"``: what every stored score names."""
        return f"{self.name}@{self.version}"

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of every field: equal hashes mean equal scoring."""
        data = self.to_dict()
        if self.kind == "organ":
            for name in _LESION_FIELDS:
                data.pop(name)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
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
        if self.kind == "organ":
            for name in _LESION_FIELDS:
                data.pop(name)
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
    """A preset by name (``"touchstone"``, ``"nsd-deepmind"``, ``"touchstone-lesions"``) or a protocol from a JSON/YAML file.

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
    except (RecursionError, MemoryError):
        # a hostile file ([[[[... twenty thousand levels deep) must get an answer, not a 500
        raise ValueError(f"protocol file {text!r} is nested too deeply or too large to be a protocol; "
                         "write it as a flat mapping like evaluation/protocols/touchstone.yaml") from None
    try:
        return Protocol.model_validate(data)
    except (RecursionError, MemoryError):
        raise ValueError(f"protocol file {text!r} is nested too deeply to be a protocol; write it as a flat "
                         "mapping like evaluation/protocols/touchstone.yaml") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(
            f"protocol file {text!r} is not a valid protocol ({problems}); "
            "fix those fields (see docs/evaluation-metrics.md or a preset's YAML)"
        ) from None
