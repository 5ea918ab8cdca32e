"""Import a test set from a manifest CSV (one row per case) into the database.

The manifest format and its reader are the evaluation package's (:mod:`evaluation.manifest`:
``case_id, image, labels, hospital`` required; ``age, sex, race, manufacturer, scanner,
contrast_phase, diagnosis, public_sample`` optional; other columns kept as extras). Protocols come
from :mod:`evaluation.protocols` (a preset name, ``name@version``, or a protocol file). Every image and
label file or folder is checksummed (:func:`evaluation.io.sha256_path`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation import manifest as ev_manifest
from evaluation.io import sha256_path
from evaluation.protocols import load_protocol
from services.config import Settings, get_settings
from services.db.models import AuditLog, Case, TestSet, User

DEFAULT_PROTOCOL = "touchstone"


class ManifestError(ValueError):
    """The manifest or protocol cannot be imported (the message names the row/column and the fix)."""


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    (PostgreSQL's JSON has no NaN; pydantic reads those strings back as floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def resolve_protocol(spec: str | None) -> tuple[str, str, dict[str, Any]]:
    """(name, version, JSON description) of a protocol preset ``name``, ``name@version`` or a file."""
    spec = (spec or DEFAULT_PROTOCOL).strip()
    name, at, version = spec.partition("@")
    try:
        protocol = load_protocol(name if at else spec)
    except ValueError as exc:
        raise ManifestError(str(exc)) from exc
    if at and str(protocol.version) != version:
        raise ManifestError(
            f"protocol {name!r} is at version {protocol.version}, not {version}; "
            f"give {name}@{protocol.version} or a protocol file"
        )
    as_dict = json_safe(json.loads(json.dumps(protocol.to_dict(), default=str, allow_nan=True)))
    return protocol.name, str(protocol.version), as_dict


def read_manifest(path: Path | str) -> ev_manifest.Manifest:
    try:
        return ev_manifest.read_manifest(path, check_files=True, verify_checksums=True)
    except ev_manifest.ManifestError as exc:
        raise ManifestError(str(exc)) from exc


def import_testset(
    session: Session,
    name: str,
    manifest: Path | str,
    protocol: str | None = None,
    settings: Settings | None = None,
    actor: User | None = None,
    progress: Callable[[int, int], None] | None = None,
    description: str | None = None,
) -> TestSet:
    """Create test set ``name`` with one Case per manifest row (checksums computed). The caller commits."""
    settings = settings or get_settings()
    manifest = Path(manifest).resolve()
    if session.scalar(sa.select(TestSet.id).where(TestSet.name == name)) is not None:
        raise ManifestError(f"a test set named {name!r} already exists; choose another name")
    read = read_manifest(manifest)
    rows = list(read.rows)
    if not any(row.public_sample for row in rows):
        raise ManifestError(
            "no case is marked public_sample; mark at least one (validation runs the image on the public sample)"
        )
    protocol_name, protocol_version, protocol_json = resolve_protocol(protocol)
    testset = TestSet(
        name=name,
        description=description,
        protocol_name=protocol_name,
        protocol_version=protocol_version,
        protocol_key=f"{protocol_name}@{protocol_version}",
        protocol_json=protocol_json,
        manifest_sha256=sha256_path(manifest),
        manifest_path=str(manifest),
        root_path=str(manifest.parent),
        time_per_case_s=settings.default_time_per_case_s,
        memory_bytes=settings.default_memory_bytes,
        gpus=settings.default_gpus,
        shm_bytes=settings.default_shm_bytes,
        pids_limit=settings.default_pids_limit,
        shard_size=settings.default_shard_size,
        quota_submissions=settings.default_quota_submissions,
        quota_period_days=settings.default_quota_period_days,
        min_group_size=settings.default_min_group_size,
    )
    session.add(testset)
    session.flush()
    for index, row in enumerate(rows):
        session.add(
            Case(
                testset_id=testset.id,
                case_id=row.case_id,
                hospital=row.hospital,
                age=row.age,
                sex=row.sex,
                race=row.race,
                manufacturer=row.manufacturer,
                scanner=row.scanner,
                contrast_phase=row.contrast_phase,
                diagnosis=row.diagnosis,
                extra=dict(row.extras),
                image_path=str(read.image_path(row)),
                labels_path=str(read.labels_path(row)),
                image_sha256=sha256_path(read.image_path(row)),
                labels_sha256=sha256_path(read.labels_path(row)),
                public_sample=row.public_sample,
            )
        )
        if progress:
            progress(index + 1, len(rows))
    session.add(
        AuditLog(
            actor_id=actor.id if actor else None,
            action="testset.import",
            target=f"testset:{testset.id}",
            details={"name": name, "manifest": str(manifest), "cases": len(rows), "protocol": testset.protocol_key},
        )
    )
    session.flush()
    return testset
