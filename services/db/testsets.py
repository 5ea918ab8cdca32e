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
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation import manifest as ev_manifest
from evaluation.io import sha256_path
from evaluation.protocols import load_protocol
from services.db.audit import audit
from services.config import Settings, get_settings
from services.db.models import Case, TestSet, User  # noqa: F401 (Case: statistics settings)

DEFAULT_PROTOCOL = "touchstone"


class ManifestError(ValueError):
    """The manifest or protocol cannot be imported (the message names the row/column and the fix)."""


# --------------------------------------------------------------------------------------------------
# server paths named through the API: confined to settings.import_roots
# --------------------------------------------------------------------------------------------------
class PathRefused(ManifestError):
    """A server path given through the API that is not a readable file inside the import roots.

    One wording for every reason (missing, unreadable, a folder, outside the roots, the database, a
    NUL byte, binary content): the answer must not tell which files exist on the server."""


def refused_message(field: str, what: str = "manifest", given: str = "") -> str:
    shown = repr(given if len(given) <= 300 else given[:300] + "...")
    return (f"{field}: no readable {what} at the given path {shown} inside the import roots "
            f"(a file under TOUCHSTONE_IMPORT_ROOTS, outside the data directory); put the {what} under one of "
            "TOUCHSTONE_IMPORT_ROOTS")


def _sqlite_file(url: str | None) -> str | None:
    text = str(url or "")
    if text.startswith("db+"):
        text = text[3:]
    if not text.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(text).database
    return None if not database or database == ":memory:" else database


def protected_paths(settings: Settings) -> tuple[list[str], list[str]]:
    """(folders, files) that no import may name or contain: the data directory, the storage, the
    broker folder, and the SQLite databases with their -wal/-shm/-journal companions."""
    folders = [Path(settings.data_dir), Path(settings.storage_dir), settings.broker_folder]  # type: ignore[arg-type]
    files = []
    for database in (_sqlite_file(settings.database_url), _sqlite_file(settings.result_backend)):
        if database:
            files += [database + suffix for suffix in ("", "-wal", "-shm", "-journal")]
    return [os.path.realpath(f) for f in folders], [os.path.realpath(f) for f in files]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def usable_import_roots(settings: Settings) -> list[str]:
    """The import roots that neither lie in nor contain the data directory, the storage or a database."""
    folders, files = protected_paths(settings)
    roots = []
    for root in settings.import_roots:
        real = os.path.realpath(root)
        if any(_inside(real, f) or _inside(f, real) for f in folders) or any(_inside(f, real) for f in files):
            continue
        roots.append(real)
    return roots


def _same_file_as_protected(st: os.stat_result, files: list[str]) -> bool:
    """A hard link to a database has another path but the same inode (``os.stat`` opens nothing)."""
    for name in files:
        try:
            other = os.stat(name)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def confine_path(raw: str | Path, settings: Settings, *, base: Path | None = None, folder_ok: bool = False) -> Path:
    """``raw`` resolved (every link followed, strictly) if it is a readable file -- or, with
    ``folder_ok``, a folder whose every entry passes too -- inside a usable import root and not
    the data directory, storage or a database; :class:`PathRefused` (no message) otherwise.

    Only ``stat``/``realpath`` run here: nothing is opened before the check passed (an SQLite
    database loses its POSIX locks when any descriptor of its file is closed)."""
    text = os.fspath(raw)
    try:
        if not text or "\x00" in text:
            raise PathRefused("")
        text.encode("utf-8")  # a lone surrogate from JSON is no path
        path = Path(text)
        if not path.is_absolute():
            if base is None:
                raise PathRefused("")
            path = base / path
        real = path.resolve(strict=True)
        st = os.stat(real)
    except (OSError, RuntimeError, ValueError):  # missing, loop, permission, NUL, undecodable
        raise PathRefused("") from None
    resolved = str(real)
    folders, files = protected_paths(settings)
    roots = usable_import_roots(settings)
    if not any(_inside(resolved, root) and resolved != root for root in roots):
        raise PathRefused("")
    if any(_inside(resolved, f) for f in folders) or resolved in files or _same_file_as_protected(st, files):
        raise PathRefused("")
    if stat.S_ISREG(st.st_mode):
        if not os.access(real, os.R_OK):
            raise PathRefused("")
        return real
    if folder_ok and stat.S_ISDIR(st.st_mode) and os.access(real, os.R_OK | os.X_OK):
        for entry in _walk(real):
            confine_path(entry, settings, folder_ok=True)
        return real
    raise PathRefused("")


def _walk(folder: Path) -> Iterator[str]:
    """Every entry under ``folder`` (links not followed: each is checked where it points)."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                yield entry.path
    except OSError:
        raise PathRefused("") from None


def confined_manifest(raw: str, settings: Settings, field: str = "manifest_path") -> Path:
    """The manifest named through the API, checked before anything reads it: inside the import
    roots, UTF-8 text without NUL bytes, and every image/labels path it names inside the roots too."""
    try:
        path = confine_path(raw, settings)
        with open(path, "rb") as handle:
            data = handle.read(64 * 1024 * 1024 + 1)
        if len(data) > 64 * 1024 * 1024 or b"\x00" in data:
            raise PathRefused("")
        data.decode("utf-8-sig")
    except (PathRefused, OSError, UnicodeDecodeError):
        raise PathRefused(refused_message(field, given=raw)) from None
    try:
        listed = ev_manifest.read_manifest(path, check_files=False)
    except ev_manifest.ManifestError as exc:
        raise ManifestError(str(exc)) from exc
    except Exception:  # noqa: BLE001 - csv.Error and the like: not a manifest
        raise PathRefused(refused_message(field, given=raw)) from None
    problems = []
    for line, row in enumerate(listed.rows, start=2):
        for column, value, folder_ok in (("image", row.image, False), ("labels", row.labels, True)):
            try:
                confine_path(value, settings, base=path.parent, folder_ok=folder_ok)
            except PathRefused:
                problems.append(f"case {row.case_id!r}, column {column}: no readable file at {value!r} inside the "
                                "import roots (paths are relative to the manifest's folder)")
    if problems:
        raise PathRefused(f"{field}: {len(problems)} problem(s): " + "; ".join(problems[:20])
                          + "; put the test set's files under one of TOUCHSTONE_IMPORT_ROOTS")
    return path


def confined_protocol(spec: str | None, settings: Settings) -> str | None:
    """A protocol given through the API: a preset (``name`` / ``name@version``) as is; a protocol file
    only inside the import roots (the same wording for every refusal)."""
    if spec is None:
        return None
    from evaluation.protocols import PRESETS

    name = spec.strip().partition("@")[0]
    if name in PRESETS:
        return spec
    try:
        path = confine_path(spec.strip(), settings)
        with open(path, "rb") as handle:
            data = handle.read(1024 * 1024 + 1)
        if len(data) > 1024 * 1024 or b"\x00" in data:
            raise PathRefused("")
        data.decode("utf-8")
    except (PathRefused, OSError, UnicodeDecodeError):
        raise PathRefused(refused_message("protocol", "protocol file", spec) + f", or name a preset ({', '.join(PRESETS)})"
                          ) from None
    return str(path)


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
    confine: bool = False,
) -> TestSet:
    """Create test set ``name`` with one Case per manifest row (checksums computed). The caller commits.

    ``confine`` (the API): the manifest, the files it names and a protocol file must lie inside
    ``settings.import_roots`` (:func:`confined_manifest`); the CLI, run on the server by the
    organizer, reads local paths as given."""
    settings = settings or get_settings()
    if confine:
        manifest = confined_manifest(str(manifest), settings)
        protocol = confined_protocol(protocol, settings)
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
    audit(session, actor, "testset.import", f"testset:{testset.id}",
          {"name": name, "manifest": str(manifest), "cases": len(rows), "protocol": testset.protocol_key})
    session.flush()
    return testset


class StatisticsSettingsError(ValueError):
    """A statistics setting of a test set that cannot be applied (the message says why)."""


#: the statistics settings of a test set (CLI ``touchstone testsets update`` and the API's PATCH)
STATISTICS_SETTINGS = ("missing_policy", "stats_preset", "stats_options", "subgroup_variables", "min_group_size")


def _case_columns(session: Session, testset: TestSet) -> set[str]:
    typed = {*ev_manifest.METADATA_FIELDS, "age_decade"}
    extras: set[str] = set()
    for extra in session.scalars(sa.select(Case.extra).where(Case.testset_id == testset.id)):
        extras.update((extra or {}).keys())
    return typed | (extras - {"source"})


def update_statistics_settings(
    session: Session,
    testset: TestSet,
    *,
    missing_policy: str | None = None,
    stats_preset: str | None = None,
    stats_options: dict[str, Any] | None = None,
    subgroup_variables: list[str] | None = None,
    min_group_size: int | None = None,
    actor: User | None = None,
    recompute: bool = True,
) -> dict[str, Any]:
    """Change how the test set's statistics are computed and recompute them (scores untouched).

    ``missing_policy``: ``worst`` | ``common``; ``stats_preset``: a name of
    :data:`services.leaderboard.STATS_PRESETS` (``default`` clears every option), individual
    ``stats_options`` (``zero_method``, ``continuity``, ``test_method``, ``correction``,
    ``test_correction``, ``family``, ``ci_method``) win over the preset; ``subgroup_variables``:
    case metadata columns, typed or extra (``[]`` = the default breakdowns); ``min_group_size``:
    the ``too_small`` / small-cell threshold. Returns the changed settings; the caller commits.
    """
    from evaluation.stats import MISSING_POLICIES
    from services.leaderboard import normalize_stats_options, recompute_all

    changes: dict[str, Any] = {}
    if missing_policy is not None:
        if missing_policy not in MISSING_POLICIES:
            raise StatisticsSettingsError(f"missing policy must be one of {list(MISSING_POLICIES)}, got {missing_policy!r}")
        changes["missing_policy"] = missing_policy
    if stats_preset is not None or stats_options:
        if stats_preset == "default":
            options: dict[str, Any] = {}
        elif stats_preset is not None:
            options = {"preset": stats_preset}
        else:
            options = dict(testset.stats_options or {})
        options.update(stats_options or {})
        try:
            changes["stats_options"] = normalize_stats_options(options)
        except ValueError as exc:
            raise StatisticsSettingsError(str(exc)) from None
    if subgroup_variables is not None:
        variables = [str(v).strip() for v in subgroup_variables if str(v).strip()]
        known = _case_columns(session, testset)
        unknown = [v for v in variables if v not in known]
        if unknown:
            raise StatisticsSettingsError(
                f"no case metadata column {', '.join(map(repr, unknown))} in test set {testset.name!r}; "
                f"columns: {', '.join(sorted(known))}")
        changes["subgroup_variables"] = variables or None
    if min_group_size is not None:
        if int(min_group_size) < 1:
            raise StatisticsSettingsError(f"min_group_size must be >= 1, got {min_group_size}")
        changes["min_group_size"] = int(min_group_size)
    if not changes:
        return changes
    for key, value in changes.items():
        setattr(testset, key, value)
    audit(session, actor, "testset.statistics", f"testset:{testset.id}", changes)
    session.flush()
    if recompute:
        recompute_all(session, testset)
    return changes
