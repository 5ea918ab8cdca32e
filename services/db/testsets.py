"""Import a test set from a manifest CSV (one row per case) into the database.

Manifest columns: ``case_id, image, labels`` (required), ``hospital, age, sex, race, manufacturer,
scanner, contrast_phase, diagnosis, public_sample`` (optional), ``extras`` (optional JSON object) and
any other column (kept in ``Case.extra``). ``image`` and ``labels`` are paths relative to the
manifest's folder (or absolute); ``labels`` is a label-map file or a folder of per-organ masks.
Every file is checksummed (sha256; a folder hashes its sorted ``name\\0sha256`` list).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.config import Settings, get_settings
from services.db.models import AuditLog, Case, TestSet, User

REQUIRED_COLUMNS = ("case_id", "image", "labels")
TYPED_COLUMNS = ("hospital", "age", "sex", "race", "manufacturer", "scanner", "contrast_phase", "diagnosis")
DEFAULT_PROTOCOL = "touchstone"
TRUE_WORDS = {"1", "true", "yes", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "n", "f", ""}


class ManifestError(ValueError):
    """The manifest cannot be imported (the message names the row/column and the fix)."""


@dataclass
class ManifestRow:
    case_id: str
    image: Path
    labels: Path
    hospital: str | None = None
    age: int | None = None
    sex: str | None = None
    race: str | None = None
    manufacturer: str | None = None
    scanner: str | None = None
    contrast_phase: str | None = None
    diagnosis: str | None = None
    public_sample: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder as the sha256 of its sorted ``relative-name\\0sha256\\n`` lines."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path).as_posix()}\0{sha256_file(child)}\n".encode())
    return digest.hexdigest()


def _parse_bool(value: str, where: str) -> bool:
    word = (value or "").strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ManifestError(f"{where}: public_sample must be true/false (or 1/0), got {value!r}")


def read_manifest_csv(path: Path) -> list[ManifestRow]:
    """Parse and check a manifest CSV (paths resolved against its folder; files must exist)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist or is not a file; give the path of the CSV on the server")
    root = path.parent.resolve()
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ManifestError(
                    f"manifest {path.name} lacks the column(s) {', '.join(missing)}; "
                    f"the header must contain {', '.join(REQUIRED_COLUMNS)}"
                )
            raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path.name} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise ManifestError(f"manifest {path.name} is not valid CSV: {exc}") from exc
    if not raw_rows:
        raise ManifestError(f"manifest {path.name} has no cases")

    rows: list[ManifestRow] = []
    seen: set[str] = set()
    missing_files: list[str] = []
    for number, raw in enumerate(raw_rows, start=2):  # line 1 is the header
        where = f"{path.name} line {number}"
        case_id = raw.get("case_id", "")
        if not case_id:
            raise ManifestError(f"{where}: case_id is empty")
        if "/" in case_id or "\\" in case_id or case_id in (".", ".."):
            raise ManifestError(f"{where}: case_id {case_id!r} must not contain path separators")
        if case_id in seen:
            raise ManifestError(f"{where}: case_id {case_id!r} appears twice; case ids must be unique")
        seen.add(case_id)
        files = {}
        for column in ("image", "labels"):
            if not raw.get(column):
                raise ManifestError(f"{where}: column {column} is empty")
            file_path = Path(raw[column])
            file_path = file_path if file_path.is_absolute() else root / file_path
            if not file_path.exists():
                missing_files.append(f"{case_id}:{column}={file_path}")
            files[column] = file_path
        age_text = raw.get("age", "")
        try:
            age = int(float(age_text)) if age_text else None
        except ValueError as exc:
            raise ManifestError(f"{where}: age must be a whole number of years, got {age_text!r}") from exc
        extra: dict[str, Any] = {}
        if raw.get("extras"):
            try:
                extra = json.loads(raw["extras"])
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: extras must be a JSON object: {exc}") from exc
            if not isinstance(extra, dict):
                raise ManifestError(f"{where}: extras must be a JSON object, got {type(extra).__name__}")
        known = set(REQUIRED_COLUMNS) | set(TYPED_COLUMNS) | {"public_sample", "extras"}
        extra.update({k: v for k, v in raw.items() if k and k not in known and v != ""})
        rows.append(
            ManifestRow(
                case_id=case_id,
                image=files["image"],
                labels=files["labels"],
                age=age,
                public_sample=_parse_bool(raw.get("public_sample", ""), where),
                extra=extra,
                **{c: (raw.get(c) or None) for c in TYPED_COLUMNS if c != "age"},
            )
        )
    if missing_files:
        shown = "; ".join(missing_files[:5])
        more = f" (and {len(missing_files) - 5} more)" if len(missing_files) > 5 else ""
        raise ManifestError(f"{len(missing_files)} file(s) named in the manifest do not exist: {shown}{more}")
    return rows


def resolve_protocol(spec: str | None) -> tuple[str, str, dict[str, Any]]:
    """(name, version, JSON description) of a protocol ``name`` or ``name@version``.

    Uses ``evaluation.protocols`` when it offers ``get_protocol``/``load_protocol``; otherwise records
    the name and version only (version ``1`` when not given).
    """
    spec = (spec or DEFAULT_PROTOCOL).strip()
    name, _, version = spec.partition("@")
    try:
        module = importlib.import_module("evaluation.protocols")
    except ImportError:
        module = None
    loader = None
    if module is not None:
        loader = getattr(module, "get_protocol", None) or getattr(module, "load_protocol", None)
    if loader is not None:
        try:
            protocol = loader(spec)
        except Exception as exc:  # noqa: BLE001 - unknown protocol, bad version...
            raise ManifestError(f"unknown protocol {spec!r}: {exc}") from exc
        as_dict = _protocol_to_dict(protocol)
        return (
            str(as_dict.get("name", name)),
            str(as_dict.get("version", version or "1")),
            as_dict,
        )
    version = version or "1"
    return name, version, {"name": name, "version": version}


def _protocol_to_dict(protocol: Any) -> dict[str, Any]:
    for attribute in ("to_dict", "model_dump", "as_dict"):
        method = getattr(protocol, attribute, None)
        if callable(method):
            return json.loads(json.dumps(method(), default=str))
    if isinstance(protocol, dict):
        return json.loads(json.dumps(protocol, default=str))
    import dataclasses

    if dataclasses.is_dataclass(protocol):
        return json.loads(json.dumps(dataclasses.asdict(protocol), default=str))
    return {"name": getattr(protocol, "name", str(protocol)), "version": str(getattr(protocol, "version", "1"))}


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
    rows = read_manifest_csv(manifest)
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
        manifest_sha256=sha256_file(manifest),
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
                extra=row.extra,
                image_path=str(row.image),
                labels_path=str(row.labels),
                image_sha256=sha256_path(row.image),
                labels_sha256=sha256_path(row.labels),
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
