"""The test-set manifest: a CSV with one row per case.

Columns (header names, any order; blank cells are "unknown"):

==================== ======== ==================================================================
column               required meaning
==================== ======== ==================================================================
case_id              yes      unique id; letters, digits, ``._-``, at most 128 characters, not
                              starting with ``.`` (it becomes a folder name ``/input/<case_id>``)
image                yes      path to the case's ``ct.nii.gz``
labels               yes      path to the case's label folder (a case folder holding
                              ``segmentations/`` or ``combined_labels.nii.gz``, or the
                              ``segmentations`` folder itself) or to a ``combined_labels`` file
hospital             yes      the hospital / centre the case comes from
age                  no       whole years, 0-130
sex                  no       ``M`` / ``F`` (``male``/``female`` accepted) or another word as is
race                 no       free text
manufacturer         no       scanner manufacturer
scanner              no       scanner model
contrast_phase       no       free text (``non_contrast``, ``arterial``, ``portal_venous`` ...)
diagnosis            no       free text
public_sample        no       ``true``/``false`` (also ``1/0``, ``yes/no``); default false. Public
                              sample cases are the ones a submission is validated on.
image_sha256         no       checked when present (``verify_checksums``)
labels_sha256        no       idem; for a folder, see :func:`evaluation.io.sha256_path`
(anything else)      no       kept as ``extras`` and written back
==================== ======== ==================================================================

Relative paths are relative to the manifest's folder; absolute paths are kept as they are.
:func:`read_manifest` reports *all* problems at once as :class:`ManifestError`, each line naming the
CSV line number (the header is line 1), the column and the fix.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evaluation.io import detect_layout, sha256_path

REQUIRED_COLUMNS = ("case_id", "image", "labels", "hospital")
OPTIONAL_COLUMNS = ("age", "sex", "race", "manufacturer", "scanner", "contrast_phase", "diagnosis", "public_sample")
CHECKSUM_COLUMNS = ("image_sha256", "labels_sha256")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + CHECKSUM_COLUMNS

_CASE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f", ""}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


class ManifestRow(BaseModel):
    """One case of a test set."""

    model_config = ConfigDict(frozen=True, str_strip_whitespace=True)

    case_id: str
    image: str
    labels: str
    hospital: str = Field(min_length=1)
    age: int | None = Field(default=None, ge=0, le=130)
    sex: str | None = None
    race: str | None = None
    manufacturer: str | None = None
    scanner: str | None = None
    contrast_phase: str | None = None
    diagnosis: str | None = None
    public_sample: bool = False
    image_sha256: str | None = None
    labels_sha256: str | None = None
    extras: dict[str, str] = Field(default_factory=dict)

    @field_validator("case_id")
    @classmethod
    def _case_id(cls, v: str) -> str:
        if not _CASE_ID.match(v):
            raise ValueError(
                "must be 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-' (it becomes a folder name)"
            )
        return v

    @field_validator("image", "labels")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v:
            raise ValueError("is empty; give a path relative to the manifest's folder")
        return v

    @field_validator("age", mode="before")
    @classmethod
    def _age(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v == "":
                return None
            try:
                f = float(v)
            except ValueError:
                raise ValueError(f"{v!r} is not a number of years") from None
            if f != int(f):
                raise ValueError(f"{v!r} is not a whole number of years")
            return int(f)
        return v

    @field_validator("sex", "race", "manufacturer", "scanner", "contrast_phase", "diagnosis", "image_sha256", "labels_sha256", mode="before")
    @classmethod
    def _blank_none(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("sex")
    @classmethod
    def _sex(cls, v: str | None) -> str | None:
        return None if v is None else _SEX.get(v.lower(), v)

    @field_validator("public_sample", mode="before")
    @classmethod
    def _bool(cls, v: Any) -> Any:
        if isinstance(v, str):
            s = v.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(f"{v!r} is not true/false")
        return v

    def image_path(self, root: Path) -> Path:
        return (root / self.image) if not Path(self.image).is_absolute() else Path(self.image)

    def labels_path(self, root: Path) -> Path:
        return (root / self.labels) if not Path(self.labels).is_absolute() else Path(self.labels)


class ManifestError(ValueError):
    """Every problem found in a manifest, one per line in ``problems``."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


class Manifest(BaseModel):
    """A read manifest: its rows in file order, and the folder relative paths start from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    root: Path
    rows: tuple[ManifestRow, ...]

    @property
    def case_ids(self) -> list[str]:
        return [r.case_id for r in self.rows]

    def row(self, case_id: str) -> ManifestRow:
        for r in self.rows:
            if r.case_id == case_id:
                return r
        raise KeyError(case_id)

    def image_path(self, row: ManifestRow) -> Path:
        return row.image_path(self.root)

    def labels_path(self, row: ManifestRow) -> Path:
        return row.labels_path(self.root)

    def checksums(self) -> dict[str, tuple[str, str]]:
        """``case_id -> (sha256 of the image, sha256 of the labels file or folder)``."""
        return {r.case_id: (sha256_path(self.image_path(r)), sha256_path(self.labels_path(r))) for r in self.rows}


def _pydantic_problems(line: int, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        column = ".".join(str(p) for p in err["loc"]) or "row"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        out.append(f"line {line}, column {column}: {msg}{shown}")
    return out


def read_manifest(
    path: Path | str, *, check_files: bool = True, verify_checksums: bool = False
) -> Manifest:
    """Read and validate a manifest CSV.

    Checks: the required columns exist; each row validates (:class:`ManifestRow`); case ids are
    unique; with ``check_files`` the image is a file and the labels a file or a folder holding labels;
    with ``verify_checksums`` the ``*_sha256`` cells that are filled match the files.
    Raises :class:`ManifestError` listing every problem (``line N`` = CSV line, header = line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, ["the manifest file does not exist; give the path to the CSV"])
    root = path.parent
    problems: list[str] = []
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    reader, header, _ = open_table(path)  # any delimiter (sniffed), UTF-8 with or without BOM
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(path, [f"line 1: missing required column(s) {missing}; the header must name {list(REQUIRED_COLUMNS)}"])
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ManifestError(path, [f"line 1: duplicate column(s) {dupes}"])
    for record in reader:
        line = reader.line_num
        if None in record:  # more cells than header columns
            problems.append(f"line {line}: {len(record[None])} more cell(s) than header columns; quote cells that contain commas")
            continue
        if all((v or "").strip() == "" for v in record.values()):
            continue  # blank line
        known = {k: (v if v is not None else "") for k, v in record.items() if k in COLUMNS}
        extras = {k: v.strip() for k, v in record.items() if k not in COLUMNS and v and v.strip()}
        try:
            row = ManifestRow(**known, extras=extras)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(line, exc))
            continue
        if row.case_id in seen:
            problems.append(f"line {line}, column case_id: duplicate case id {row.case_id!r} (first on line {seen[row.case_id]})")
            continue
        seen[row.case_id] = line
        if check_files:
            problems.extend(_file_problems(line, row, root, verify_checksums))
        rows.append(row)
    if not rows and not problems:
        problems.append("no case rows; add one row per case under the header")
    if problems:
        raise ManifestError(path, problems)
    return Manifest(root=root, rows=tuple(rows))


def _file_problems(line: int, row: ManifestRow, root: Path, verify: bool) -> list[str]:
    out = []
    image, labels = row.image_path(root), row.labels_path(root)
    if not image.is_file():
        out.append(f"line {line}, column image: {row.image!r} does not exist (paths are relative to the manifest's folder)")
    if not labels.exists():
        out.append(f"line {line}, column labels: {row.labels!r} does not exist (paths are relative to the manifest's folder)")
    elif detect_layout(labels) is None:
        out.append(
            f"line {line}, column labels: {row.labels!r} holds no labels; point it at a case folder with "
            "segmentations/ or combined_labels.nii.gz, the segmentations folder, or a label file"
        )
    if verify:
        for column, p, expected in (("image_sha256", image, row.image_sha256), ("labels_sha256", labels, row.labels_sha256)):
            if expected and p.exists() and sha256_path(p) != expected.lower():
                out.append(f"line {line}, column {column}: checksum mismatch for {p.name}; the file changed since the manifest was written")
    return out


def write_manifest(path: Path | str, rows: Iterable[ManifestRow], *, checksums: bool = False) -> Path:
    """Write rows as a manifest CSV (required, optional, checksum, then extra columns).

    With ``checksums``, ``image_sha256`` / ``labels_sha256`` are computed from the files (paths
    relative to the manifest's folder) for rows that lack them.
    """
    path = Path(path)
    root = path.parent
    rows = list(rows)
    extra_cols: list[str] = []
    for r in rows:
        extra_cols += [k for k in r.extras if k not in extra_cols]
    columns = list(COLUMNS) + extra_cols
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            record = r.model_dump(exclude={"extras"})
            if checksums:
                record["image_sha256"] = record["image_sha256"] or sha256_path(r.image_path(root))
                record["labels_sha256"] = record["labels_sha256"] or sha256_path(r.labels_path(root))
            record["public_sample"] = "true" if r.public_sample else "false"
            record = {k: ("" if v is None else v) for k, v in record.items()}
            record.update(r.extras)
            writer.writerow(record)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# case metadata files (any delimiter, UTF-8 with or without BOM), e.g. Touchstone's metaTotalSeg.csv
# --------------------------------------------------------------------------------------------

#: typed case metadata fields (columns of the ``cases`` table); anything else is kept as an extra
METADATA_FIELDS = ("hospital", "age", "sex", "race", "manufacturer", "scanner", "contrast_phase", "diagnosis")
#: Touchstone's TotalSegmentator metadata (``utils/metaTotalSeg.csv``, semicolon-separated)
TOUCHSTONE_TOTALSEG_COLUMNS = (
    "image_id", "age", "gender", "institute", "study_type", "split", "manufacturer", "scanner_model", "kvp",
    "pathology", "pathology_location",
)
TOUCHSTONE_TOTALSEG_MAP = {
    "image_id": "case_id", "institute": "hospital", "gender": "sex", "scanner_model": "scanner",
    "pathology": "diagnosis",
}


class MetadataError(ValueError):
    """Problems of a metadata file, each naming file, row and column (``problems``)."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"{path}: {len(problems)} problem(s); nothing was stored:\n"
                         + "\n".join(f"  - {p}" for p in shown))


class CaseMetadata(BaseModel):
    """A read metadata file: typed fields and extras per case, and how its columns were used."""

    model_config = ConfigDict(frozen=True)

    path: str
    delimiter: str
    layout: str  # "touchstone-totalsegmentator" or "generic"
    mapping: dict[str, str]  # source column -> field (case_id or a typed field)
    extras: tuple[str, ...]  # source columns kept as extra metadata (their own names)
    rows: dict[str, dict[str, Any]]  # case_id -> typed fields (age int) + {"extra": {...}}
    row_numbers: dict[str, int]  # case_id -> file row (header = row 1)

    def describe(self) -> list[str]:
        """Lines for the import's report: which column became which field, which were kept."""
        lines = [f"metadata {self.path} ({self.layout}, delimiter {self.delimiter!r}, {len(self.rows)} cases)"]
        lines += [f"  {src} -> {dst}" for src, dst in self.mapping.items()]
        if self.extras:
            lines.append(f"  kept as extra metadata: {', '.join(self.extras)}")
        return lines


def open_table(path: Path) -> tuple[Any, list[str], str]:
    """``(csv.DictReader, header, delimiter)`` of a delimited text file: UTF-8 with or without
    BOM, delimiter sniffed among comma, semicolon and tab (comma when undecidable)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, [f"byte {exc.start}: not UTF-8 text; save the file as UTF-8 (with or without BOM)"]) from None
    first = text.splitlines()[0] if text else ""
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    try:
        sniffed = csv.Sniffer().sniff(text[:65536], delimiters=",;\t").delimiter
        if counts.get(sniffed, 0) == counts[delimiter]:
            delimiter = sniffed
    except csv.Error:
        pass
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    return reader, header, delimiter


def _parse_age(cell: str) -> int:
    age = float(cell)
    if not (age == age and 0 <= age <= 150):
        raise ValueError
    return int(age)


def read_case_metadata(
    path: Path | str, mapping: dict[str, str] | None = None, *, id_columns: tuple[str, ...] = ("case_id", "name"),
) -> CaseMetadata:
    """Read a case metadata file.

    Columns: Touchstone's TotalSegmentator file is recognised by its header and mapped with
    :data:`TOUCHSTONE_TOTALSEG_MAP` (``image_id -> case_id``, ``institute -> hospital``, ``gender
    -> sex``, ``scanner_model -> scanner``, ``pathology -> diagnosis``); in any file a column named
    like a field (``case_id``/``name``, ``hospital``, ``age``, ...) is that field; ``mapping``
    (``{source column: field}``, the CLI's ``--metadata-map``) adds or overrides. Every other
    column is kept as extra metadata under its own name. Values are kept as written (stripped);
    ``age`` must be a number of years (``50.00`` is 50). Raises :class:`MetadataError` listing
    every duplicate case id, unparsable age and unknown column of ``mapping``.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataError(path, ["the metadata file does not exist"])
    reader, header, delimiter = open_table(path)
    problems: list[str] = []
    layout = "generic"
    chosen: dict[str, str] = {}
    if set(TOUCHSTONE_TOTALSEG_MAP) <= set(header) and "image_id" in header:
        layout = "touchstone-totalsegmentator"
        chosen.update(TOUCHSTONE_TOTALSEG_MAP)
    for column in header:
        if column in METADATA_FIELDS and column not in chosen and column not in chosen.values():
            chosen[column] = column
    if not any(v == "case_id" for v in chosen.values()):
        for column in id_columns:
            if column in header:
                chosen[column] = "case_id"
                break
    for source, field in (mapping or {}).items():
        if source not in header:
            problems.append(f"row 1, column {source}: --metadata-map names a column the file does not have "
                            f"(columns: {', '.join(header)})")
            continue
        if field not in ("case_id", *METADATA_FIELDS):
            problems.append(f"row 1, column {source}: cannot map to {field!r}; fields: case_id, "
                            f"{', '.join(METADATA_FIELDS)} (other columns are kept as extras by their name)")
            continue
        for other in [s for s, f in chosen.items() if f == field and s != source]:
            del chosen[other]
        chosen[source] = field
    id_column = next((s for s, f in chosen.items() if f == "case_id"), None)
    if id_column is None:
        problems.append(f"row 1: no case id column; name one 'case_id' (or 'name') or map one with "
                        f"--metadata-map COLUMN=case_id (columns: {', '.join(header)})")
    if problems:
        raise MetadataError(path, problems)
    extras = tuple(c for c in header if c and c not in chosen)
    rows: dict[str, dict[str, Any]] = {}
    row_numbers: dict[str, int] = {}
    for row_number, record in enumerate(reader, start=2):
        if all((v or "").strip() == "" for v in record.values() if isinstance(v, str)):
            continue
        case_id = (record.get(id_column) or "").strip()
        if not case_id:
            problems.append(f"row {row_number}, column {id_column}: empty case id")
            continue
        if case_id in rows:
            problems.append(f"row {row_number}, column {id_column}: duplicate case id {case_id!r} "
                            f"(first on row {row_numbers[case_id]})")
            continue
        values: dict[str, Any] = {}
        for source, field in chosen.items():
            if field == "case_id":
                continue
            cell = (record.get(source) or "").strip()
            if cell == "":
                continue
            if field == "age":
                try:
                    values["age"] = _parse_age(cell)
                except ValueError:
                    problems.append(f"row {row_number}, column {source}: {cell!r} is not an age in years")
                    continue
            else:
                values[field] = cell
        extra = {c: (record.get(c) or "").strip() for c in extras if (record.get(c) or "").strip()}
        if extra:
            values["extra"] = extra
        rows[case_id] = values
        row_numbers[case_id] = row_number
    if problems:
        raise MetadataError(path, problems)
    return CaseMetadata(path=str(path), delimiter=delimiter, layout=layout,
                        mapping={s: f for s, f in chosen.items()}, extras=extras, rows=rows,
                        row_numbers=row_numbers)
