"""Streamed exports of a test set's results: per case, per hospital, per subgroup; CSV or Parquet.

Rows are read with ``yield_per`` (a server-side cursor on PostgreSQL: the result is never loaded
whole) and written in chunks: CSV text chunks, or Parquet row groups of :data:`ROW_GROUP` rows
through one ``pyarrow.parquet.ParquetWriter`` whose sink hands each finished group on (the file
is never held in memory either). Every row names the protocol version that made the score and the
submission's image digest (``image_digest``: the Docker image id recorded at validation;
``image_sha256``: the uploaded tarball's sha256, or for imported baselines the sha256 of their
result files); case rows also carry the CT's sha256 (``case_image_sha256``).

Levels and columns: see :data:`COLUMNS` (and docs/leaderboard.md). ``case``: one row per case and
class (organ or lesion class) with every stored metric (the lesion metrics are empty but for a
lesion class of a ``kind: lesion`` protocol); ``lesion``: one row per connected component of truth
and prediction of a lesion class (size, matched or not, IoU and DSC with its match), with the
visibility of case rows.

Who gets what (:mod:`services.leaderboard.suppression`): ``scope=all`` is the organizers' export,
every number, each group row flagged ``suppressed``. Any other export (analysts) holds, at case
and lesion level, the public-sample cases only (hidden per-case scores never leave for non-organizers), and
at hospital / subgroup level, for a group with fewer than the test set's ``min_group_size`` hidden
cases, ``n`` = ``"< k"`` (CSV; null in Parquet, whose ``n`` is an integer column) and no statistic.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation.manifest import METADATA_FIELDS
from evaluation.metric_registry import LESION_METRICS, ORGAN_METRICS
from services.db.models import Aggregate, Algorithm, Case, Lesion, Score, Submission, Team, TestSet
from services.leaderboard import suppression
from services.leaderboard.compute import SCOPE_STATES

LEVELS = ("case", "hospital", "subgroup", "lesion")
#: levels that hold per-case values (public-sample cases only for non-organizers)
CASE_LEVELS = ("case", "lesion")
FORMATS = ("csv", "parquet")
ROW_GROUP = 50_000
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}

_SUBMISSION = [
    ("testset", pa.string()), ("protocol_key", pa.string()), ("submission_id", pa.int64()),
    ("algorithm", pa.string()), ("team", pa.string()), ("is_baseline", pa.bool_()), ("state", pa.string()),
    ("image_digest", pa.string()), ("image_sha256", pa.string()),
]
_CASE = [
    ("case_id", pa.string()), ("case_image_sha256", pa.string()),
    *((column, pa.int64() if column == "age" else pa.string()) for column in METADATA_FIELDS),
    ("organ", pa.string()),
    *((metric, pa.float64()) for metric in ORGAN_METRICS + LESION_METRICS),
    ("status", pa.string()),
]
#: one connected component (evaluation.lesions.Lesion) of a lesion class of one case
_LESION = [
    ("case_id", pa.string()), ("case_image_sha256", pa.string()), ("organ", pa.string()),
    ("side", pa.string()), ("component", pa.int64()), ("voxels", pa.int64()), ("volume_mm3", pa.float64()),
    ("diameter_mm", pa.float64()), ("matched", pa.bool_()), ("matched_to", pa.int64()),
    ("iou", pa.float64()), ("dsc", pa.float64()),
]
_GROUP = [
    ("variable", pa.string()), ("group", pa.string()), ("organ", pa.string()), ("metric", pa.string()),
    ("n", pa.int64()), ("n_failed", pa.int64()), ("n_missing", pa.int64()), ("mean", pa.float64()),
    ("median", pa.float64()), ("std", pa.float64()), ("mean_ci_low", pa.float64()), ("mean_ci_high", pa.float64()),
    ("median_ci_low", pa.float64()), ("median_ci_high", pa.float64()),
    # what produced the numbers (issue 9): small group flag, interval method, missing-case policy and
    # the statistical options / tie rule (services.leaderboard.StatsOptions.footer)
    ("too_small", pa.bool_()), ("withheld", pa.bool_()), ("ci_method", pa.string()), ("missing_policy", pa.string()),
    ("statistics", pa.string()),
    ("suppressed", pa.bool_()),
]
SCHEMAS: dict[str, pa.Schema] = {
    "case": pa.schema(_SUBMISSION + _CASE),
    "hospital": pa.schema(_SUBMISSION + _GROUP),
    "subgroup": pa.schema(_SUBMISSION + _GROUP),
    "lesion": pa.schema(_SUBMISSION + _LESION),
}
#: level -> column names, in order
COLUMNS: dict[str, list[str]] = {level: schema.names for level, schema in SCHEMAS.items()}


class ExportError(ValueError):
    """A bad export request (the message lists the valid values)."""


def check(level: str, fmt: str, scope: str) -> None:
    if level not in LEVELS:
        raise ExportError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if scope not in SCOPE_STATES:
        raise ExportError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPE_STATES)}")


def _statement(testset: TestSet, level: str, scope: str) -> sa.Select:
    submission_cols = [
        sa.literal(testset.name).label("testset"), sa.literal(testset.protocol_key).label("protocol_key"),
        Submission.id, Algorithm.name, Team.name, Submission.is_baseline, Submission.state,
        Submission.image_digest, Submission.image_sha256,
    ]
    in_scope = (Submission.testset_id == testset.id, Submission.state.in_(SCOPE_STATES[scope]))
    # hidden cases' per-case scores: organizers only (scope=all); anyone else the public sample
    visible_cases = () if suppression.reveals(scope) else (Case.public_sample.is_(True),)
    if level == "lesion":
        return (
            sa.select(*submission_cols, Case.case_id, Case.image_sha256, Score.organ, Lesion.side,
                      Lesion.component, Lesion.voxels, Lesion.volume_mm3, Lesion.diameter_mm,
                      Lesion.matched_to.is_not(None).label("matched"), Lesion.matched_to, Lesion.iou, Lesion.dsc)
            .select_from(Lesion)
            .join(Score, Score.id == Lesion.score_id)
            .join(Submission, Submission.id == Score.submission_id)
            .join(Algorithm, Algorithm.id == Submission.algorithm_id)
            .join(Team, Team.id == Submission.team_id)
            .join(Case, Case.id == Score.case_id)
            .where(*in_scope, Score.protocol_key == testset.protocol_key, *visible_cases)
            .order_by(Submission.id, Case.case_id, Score.organ, Lesion.side.desc(), Lesion.component)
        )
    if level == "case":
        return (
            sa.select(*submission_cols, Case.case_id, Case.image_sha256, *(getattr(Case, c) for c in METADATA_FIELDS),
                      Score.organ, *(getattr(Score, m) for m in ORGAN_METRICS + LESION_METRICS), Score.status)
            .select_from(Score)
            .join(Submission, Submission.id == Score.submission_id)
            .join(Algorithm, Algorithm.id == Submission.algorithm_id)
            .join(Team, Team.id == Submission.team_id)
            .join(Case, Case.id == Score.case_id)
            .where(*in_scope, Score.protocol_key == testset.protocol_key, *visible_cases)
            .order_by(Submission.id, Case.case_id, Score.organ)
        )
    from services.leaderboard.compute import breakdown_variables, options_for_testset

    breakdowns = breakdown_variables(testset)
    variables = ["hospital"] if level == "hospital" else [v for v in breakdowns if v != "hospital"]
    return (
        sa.select(*submission_cols, Aggregate.scope, Aggregate.group_value, Aggregate.organ, Aggregate.metric,
                  Aggregate.n, Aggregate.n_failed, Aggregate.n_missing, Aggregate.mean, Aggregate.median,
                  Aggregate.std, Aggregate.ci_low, Aggregate.ci_high, Aggregate.median_ci_low,
                  Aggregate.median_ci_high, Aggregate.too_small, Aggregate.withheld, Aggregate.ci_method,
                  sa.literal(testset.missing_policy).label("missing_policy"),
                  sa.literal(options_for_testset(testset).footer()).label("statistics"))
        .select_from(Aggregate)
        .join(Submission, Submission.id == Aggregate.submission_id)
        .join(Algorithm, Algorithm.id == Submission.algorithm_id)
        .join(Team, Team.id == Submission.team_id)
        .where(*in_scope, Aggregate.protocol_key == testset.protocol_key, Aggregate.scope.in_(variables))
        .order_by(Submission.id, Aggregate.scope, Aggregate.group_value, Aggregate.metric, Aggregate.organ)
    )


def _suppressor(testset: TestSet, level: str, scope: str):
    """Rows of one (submission, variable) block -> rows of a group level: the ``suppressed``
    column added and, outside ``scope=all``, small groups (and their complements, decided per
    organ and metric within the block) blanked by
    :func:`services.leaderboard.suppression.suppress_breakdown`."""
    names = COLUMNS[level]
    k, reveal = int(testset.min_group_size or 1), suppression.reveals(scope)

    def apply(block: list[tuple]) -> list[tuple]:
        dicts = [dict(zip(names[:-1], row)) for row in block]
        return [tuple(out[name] for name in names) for out in suppression.suppress_breakdown(dicts, k, reveal)]

    return apply


def iter_row_chunks(session: Session, testset: TestSet, level: str, scope: str = "published",
                    chunk: int = ROW_GROUP) -> Iterator[list[tuple]]:
    """Lists of at most ``chunk`` rows (tuples in :data:`COLUMNS` order), streamed from the database.

    Group levels are read in (submission, variable) blocks -- the statement orders them so --
    because suppressing a breakdown needs all of its groups; a block is a few hundred rows."""
    names = COLUMNS[level]
    state_index = names.index("state")
    suppress = _suppressor(testset, level, scope) if level not in CASE_LEVELS else None
    block_of = (lambda row: (row[names.index("submission_id")], row[names.index("variable")])) if suppress else None
    result = session.execute(_statement(testset, level, scope).execution_options(yield_per=min(chunk, 5000)))
    batch: list[tuple] = []
    block: list[tuple] = []
    for row in result:
        row = tuple(row)
        state = row[state_index]
        row = row[:state_index] + (getattr(state, "value", state),) + row[state_index + 1:]
        if suppress is None:
            batch.append(row)
        else:
            if block and block_of(block[0]) != block_of(row):
                batch.extend(suppress(block))
                block = []
            block.append(row)
        if len(batch) >= chunk:
            yield batch
            batch = []
    if block:
        batch.extend(suppress(block))
    if batch:
        yield batch


def stream_csv(session: Session, testset: TestSet, level: str, scope: str = "published",
               chunk: int = 5000) -> Iterator[bytes]:
    """CSV (header + rows) as UTF-8 byte chunks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS[level])
    for rows in iter_row_chunks(session, testset, level, scope, chunk):
        writer.writerows(rows)
        yield buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode("utf-8")


class _ChunkSink(io.RawIOBase):
    """A write-only sink that keeps what was written until :meth:`drain` hands it on."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._chunks.append(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks = []
        return out


def _table(rows: Sequence[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in schema.names]
    arrays = []
    for col, field in zip(columns, schema):
        values = list(col)
        if pa.types.is_integer(field.type):  # a suppressed count ("< k") is null in an integer column
            values = [None if isinstance(v, str) else v for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _metadata(testset: TestSet, level: str, scope: str) -> dict[bytes, bytes]:
    return {b"touchstone.testset": testset.name.encode(), b"touchstone.protocol_key": testset.protocol_key.encode(),
            b"touchstone.level": level.encode(), b"touchstone.scope": scope.encode(),
            b"touchstone.min_group_size": str(int(testset.min_group_size or 1)).encode()}


def stream_parquet(session: Session, testset: TestSet, level: str, scope: str = "published",
                   row_group: int = ROW_GROUP) -> Iterator[bytes]:
    """Parquet bytes, one row group per ``row_group`` rows, handed on as each group is written."""
    schema = SCHEMAS[level].with_metadata(_metadata(testset, level, scope))
    sink = _ChunkSink()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    try:
        for rows in iter_row_chunks(session, testset, level, scope, row_group):
            writer.write_table(_table(rows, schema), row_group_size=row_group)
            data = sink.drain()
            if data:
                yield data
    finally:
        writer.close()
    tail = sink.drain()
    if tail:
        yield tail


def stream(session: Session, testset: TestSet, level: str, fmt: str, scope: str = "published") -> Iterator[bytes]:
    check(level, fmt, scope)
    return stream_csv(session, testset, level, scope) if fmt == "csv" else stream_parquet(session, testset, level, scope)


def write(session: Session, testset: TestSet, level: str, fmt: str, out: BinaryIO, scope: str = "published") -> int:
    """Write the export to ``out``; returns bytes written."""
    total = 0
    for data in stream(session, testset, level, fmt, scope):
        out.write(data)
        total += len(data)
    return total


def describe() -> dict[str, Any]:
    return {"levels": list(LEVELS), "formats": list(FORMATS), "columns": COLUMNS}
