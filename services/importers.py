"""Import results published in the Touchstone format as published baseline submissions.

Format (the Touchstone benchmark's released per-case results)::

    DIR/
      <model>/dsc.csv     name,aorta,gall_bladder,kidney_left,kidney_right,liver,pancreas,postcava,spleen,stomach
      <model>/nsd.csv     same columns
      ...

``name`` is the case id; each organ column holds the score in [0, 1]; an empty cell means "not
scored" (e.g. the organ is absent from the reference), and so does the text ``nan`` that pandas
writes (Touchstone's published files hold it). Extra columns are ignored. Each model
folder becomes one algorithm (named after the folder) of the import team with one submission
flagged ``is_baseline``, state ``published``, not counting against any quota. Cases the test set
lacks are created (without image or labels; metadata from the optional metadata file, read by
:func:`evaluation.manifest.read_case_metadata`: any delimiter, UTF-8 with or without BOM,
Touchstone's ``metaTotalSeg.csv`` recognised by its header, ``metadata_map`` for other files, every
other column kept as extra metadata). A metadata row of a case with no result and not in the test
set is reported and skipped. A test set created here uses the ``common`` missing-case policy.
Importing the same model again replaces its scores.

Everything is read and checked before anything is written: a malformed file stops the import with
a message naming the file, row and column, and nothing is stored.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation.labels import ORGANS
from services.db.audit import audit
from services.config import Settings, get_settings
from services.db.base import utcnow
from services.db.enums import SubmissionState
from services.db.models import Algorithm, Case, Score, Submission, Team, TestSet, User

METRIC_FILES = {"dsc": "dsc.csv", "nsd": "nsd.csv"}
CASE_COLUMN = "name"
DEFAULT_TEAM = "Touchstone (published)"


class TouchstoneFormatError(ValueError):
    """The folder or one of its files is not in the Touchstone result format (message says where)."""


@dataclass
class ModelResults:
    """One model folder: ``scores[case_id][organ] = {"dsc": v | None, "nsd": v | None}``."""

    name: str
    folder: Path
    sha256: dict[str, str]
    scores: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    #: "dsc.csv row N: case X repeats row M" for every repeated case id (the first value is kept)
    repeated: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    testset: str
    created_testset: bool
    models: list[str]
    submission_ids: list[int]
    cases_created: int
    scores: int
    #: how the metadata file's columns were used, and rows skipped (lines for the CLI)
    metadata: list[str] = field(default_factory=list)
    metadata_skipped: list[str] = field(default_factory=list)
    #: repeated case ids in the result files (first value per organ kept, as Touchstone does)
    repeated: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_metric_csv(path: Path, repeated: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    """``{case_id: {organ: value | None}}`` of one dsc.csv / nsd.csv, checked cell by cell.

    A case id on several rows (Touchstone's own published files have some) keeps, per organ, the
    first row's value that is not empty -- what Touchstone's ``allign()`` does (``dropna()`` then
    ``drop_duplicates(subset=["name"])``, first kept); each repetition is noted in ``repeated``."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise TouchstoneFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise TouchstoneFormatError(f"{path}: empty file; expected a header '{CASE_COLUMN},{','.join(ORGANS)}'")
        reader.fieldnames = header
        missing = [c for c in (CASE_COLUMN, *ORGANS) if c not in header]
        if missing:
            raise TouchstoneFormatError(
                f"{path}: missing column(s) {', '.join(missing)}; a Touchstone result file has the columns "
                f"{CASE_COLUMN},{','.join(ORGANS)}"
            )
        out: dict[str, dict[str, float | None]] = {}
        first_row: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):  # row 1 is the header
            case_id = (row.get(CASE_COLUMN) or "").strip()
            if not case_id:
                raise TouchstoneFormatError(f"{path}, row {row_number}: empty '{CASE_COLUMN}' (the case id)")
            if case_id in first_row and repeated is not None:
                repeated.append(f"{path.name} row {row_number}: case {case_id!r} repeats row {first_row[case_id]} "
                                "(the first non-empty value per organ is kept)")
            first_row.setdefault(case_id, row_number)
            values: dict[str, float | None] = {}
            for organ in ORGANS:
                cell = (row.get(organ) or "").strip()
                if cell == "" or cell.lower() == "nan":
                    values[organ] = None
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise TouchstoneFormatError(
                        f"{path}, row {row_number}, column {organ}: {cell!r} is not a number "
                        f"(leave the cell empty for 'not scored')"
                    ) from None
                if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                    raise TouchstoneFormatError(
                        f"{path}, row {row_number}, column {organ}: {cell} is outside [0, 1]"
                    )
                values[organ] = value
            earlier = out.setdefault(case_id, values)
            if earlier is not values:
                for organ, value in values.items():
                    if earlier[organ] is None:
                        earlier[organ] = value
    return out


def read_model_folder(folder: Path) -> ModelResults:
    missing = [f for f in METRIC_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise TouchstoneFormatError(f"model folder {folder} lacks {' and '.join(missing)}")
    model = ModelResults(name=folder.name, folder=folder,
                         sha256={m: _sha256(folder / f) for m, f in METRIC_FILES.items()})
    for metric, filename in METRIC_FILES.items():
        for case_id, values in read_metric_csv(folder / filename, model.repeated).items():
            case = model.scores.setdefault(case_id, {})
            for organ, value in values.items():
                case.setdefault(organ, {"dsc": None, "nsd": None})[metric] = value
    return model


def read_touchstone_dir(directory: Path) -> list[ModelResults]:
    """Every model folder of ``directory`` (sorted by name); at least one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TouchstoneFormatError(f"{directory} is not a folder; give the folder holding one folder per model")
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        if all((directory / f).is_file() for f in METRIC_FILES.values()):
            raise TouchstoneFormatError(
                f"{directory} holds dsc.csv/nsd.csv itself; give its parent folder (one folder per model)"
            )
        raise TouchstoneFormatError(f"{directory} has no model folder (each holding dsc.csv and nsd.csv)")
    return [read_model_folder(f) for f in folders]


def read_metadata_csv(path: Path, mapping: dict[str, str] | None = None):
    """The case metadata file (:func:`evaluation.manifest.read_case_metadata`), errors as
    :class:`TouchstoneFormatError`."""
    from evaluation.manifest import MetadataError, read_case_metadata

    try:
        return read_case_metadata(Path(path), mapping)
    except MetadataError as exc:
        raise TouchstoneFormatError(str(exc)) from None


def _get_or_create_testset(session: Session, name: str, directory: Path, settings: Settings) -> tuple[TestSet, bool]:
    testset = session.scalar(sa.select(TestSet).where(TestSet.name == name))
    if testset is not None:
        return testset, False
    from services.db.testsets import resolve_protocol

    protocol_name, protocol_version, protocol_json = resolve_protocol("touchstone")
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.csv")):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + _sha256(path).encode())
    testset = TestSet(
        name=name,
        description="results imported from the published Touchstone format (no images stored here)",
        protocol_name=protocol_name, protocol_version=protocol_version,
        protocol_key=f"{protocol_name}@{protocol_version}", protocol_json=protocol_json,
        manifest_sha256=digest.hexdigest(), manifest_path=None, root_path=str(directory),
        time_per_case_s=settings.default_time_per_case_s, memory_bytes=settings.default_memory_bytes,
        gpus=settings.default_gpus, shm_bytes=settings.default_shm_bytes, pids_limit=settings.default_pids_limit,
        shard_size=settings.default_shard_size, quota_submissions=settings.default_quota_submissions,
        quota_period_days=settings.default_quota_period_days, is_open=False,
        min_group_size=settings.default_min_group_size,
        # published baselines miss cases: compare on the cases they share (Touchstone's own rule)
        missing_policy="common",
    )
    session.add(testset)
    session.flush()
    return testset, True


def import_touchstone(
    session: Session,
    directory: Path | str,
    testset_name: str,
    *,
    metadata: Path | str | None = None,
    metadata_map: dict[str, str] | None = None,
    team_name: str = DEFAULT_TEAM,
    actor: User | None = None,
    settings: Settings | None = None,
    recompute: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> ImportReport:
    """Import every model folder of ``directory`` into test set ``testset_name`` (created, closed to
    submissions and with the ``touchstone`` protocol, when it does not exist), then recompute the
    leaderboard statistics. The caller commits."""
    settings = settings or get_settings()
    directory = Path(directory).resolve()
    models = read_touchstone_dir(directory)
    table = read_metadata_csv(Path(metadata), metadata_map) if metadata else None
    meta = table.rows if table else {}

    testset, created = _get_or_create_testset(session, testset_name, directory, settings)
    protocol_key = testset.protocol_key
    cases = {c.case_id: c for c in session.scalars(sa.select(Case).where(Case.testset_id == testset.id))}
    all_ids = sorted({cid for m in models for cid in m.scores})
    skipped: list[str] = []
    if table is not None:
        known = set(all_ids) | set(cases)
        unknown = [c for c in meta if c not in known]
        skipped = [f"{table.path}, row {table.row_numbers[c]}, column "
                   f"{next(s for s, f in table.mapping.items() if f == 'case_id')}: case {c!r} has no result "
                   f"and is not in test set {testset_name!r}: skipped" for c in unknown]
    created_cases = 0
    for case_id in all_ids:
        values = dict(meta.get(case_id, {}))
        extra = values.pop("extra", {})
        if case_id not in cases:
            case = Case(testset_id=testset.id, case_id=case_id, image_path="", labels_path="",
                        extra={"source": "touchstone-import", **extra}, **values)
            session.add(case)
            cases[case_id] = case
            created_cases += 1
        else:
            case = cases[case_id]
            for column, value in values.items():
                if getattr(case, column) is None:
                    setattr(case, column, value)
            if extra:
                case.extra = {**extra, **(case.extra or {})}
    session.flush()

    team = session.scalar(sa.select(Team).where(Team.name == team_name))
    if team is None:
        team = Team(name=team_name)
        session.add(team)
        session.flush()
    now = utcnow()
    submission_ids: list[int] = []
    n_scores = 0
    for index, model in enumerate(models):
        algorithm = session.scalar(sa.select(Algorithm).where(Algorithm.team_id == team.id, Algorithm.name == model.name))
        if algorithm is None:
            algorithm = Algorithm(team_id=team.id, name=model.name,
                                  description="published Touchstone results (imported)")
            session.add(algorithm)
            session.flush()
        submission = session.scalar(
            sa.select(Submission).where(Submission.algorithm_id == algorithm.id, Submission.testset_id == testset.id,
                                        Submission.is_baseline.is_(True))
        )
        # the team reads this log: the folder's own name only; the server path is in the audit log
        provenance = (f"imported from {Path(model.folder).name}/ (dsc.csv sha256 {model.sha256['dsc']}, "
                      f"nsd.csv sha256 {model.sha256['nsd']}) at {now.isoformat()}")
        combined = hashlib.sha256((model.sha256["dsc"] + model.sha256["nsd"]).encode()).hexdigest()
        if submission is None:
            submission = Submission(
                algorithm_id=algorithm.id, testset_id=testset.id, team_id=team.id,
                submitted_by_id=actor.id if actor else None, state=SubmissionState.published,
                received_at=now, scored_at=now, published_at=now, is_baseline=True, counts_against_quota=False,
                image_ref=f"touchstone-import:{model.name}",
            )
            session.add(submission)
        submission.image_sha256 = combined
        submission.validation_log = provenance
        session.flush()
        session.execute(sa.delete(Score).where(Score.submission_id == submission.id, Score.protocol_key == protocol_key))
        rows = [
            {"submission_id": submission.id, "case_id": cases[case_id].id, "organ": organ, "protocol_key": protocol_key,
             "dsc": v["dsc"], "nsd": v["nsd"], "status": "ok", "detail": "imported"}
            for case_id, organs in model.scores.items()
            for organ, v in organs.items()
            if v["dsc"] is not None or v["nsd"] is not None
        ]
        if rows:
            session.execute(sa.insert(Score), rows)
        n_scores += len(rows)
        submission_ids.append(submission.id)
        if progress:
            progress(model.name, index + 1, len(models))
    audit(session, actor, "results.import_touchstone", f"testset:{testset.id}",
          {"directory": str(directory), "models": [m.name for m in models], "cases_created": created_cases,
           "scores": n_scores})
    session.flush()
    if recompute:
        from services.leaderboard import recompute_testset

        recompute_testset(session, testset, submission_ids=submission_ids)
    lines = table.describe() if table else []
    if skipped:
        lines.append(f"  {len(skipped)} metadata row(s) name cases without results (skipped)")
    return ImportReport(testset=testset.name, created_testset=created, models=[m.name for m in models],
                        submission_ids=submission_ids, cases_created=created_cases, scores=n_scores,
                        metadata=lines, metadata_skipped=skipped,
                        repeated=[f"{m.name}/{line}" for m in models for line in m.repeated])
