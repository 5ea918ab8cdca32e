"""The pairwise-test cache of the leaderboard statistics (table ``pairwise_cache``, 0007_pairwise_cache).

A paired Wilcoxon test of two submissions depends only on their two rows of a score matrix and on
the test options -- not on the other submissions. :class:`PairCache` therefore keeps the raw result
of every unordered pair (:class:`evaluation.stats.wilcoxon.PairTests`: V, z, both one-sided p-values,
n_common, the differences) per

  (test set, protocol key, organ, metric, ``options_key``, ``cases_hash``, submission a < b,
   ``values_hash``)

and reuses it while ``values_hash`` -- both submissions' values on that case axis -- is unchanged.
So a newly scored, republished or unpublished submission costs the tests of the pairs it is in;
a rescoring changes the values hash and re-tests that submission's pairs; new test options
change ``options_key``. What depends on the whole family -- the multiple-comparison correction,
test-then-rank, rankings, the bootstrap -- is recomputed from these raw results every time
(:mod:`services.leaderboard.compute`).

Hashes: ``options_key`` = the Wilcoxon options (zero method, continuity, method; alpha and the
correction are not inputs of a raw test); ``cases_hash`` = the case ids of the matrix's case axis
in order (under the ``common`` policy: the cases every ranked submission has); a row hash =
BLAKE2b of the row's float64 values on that axis (NaN = not scored, so it fixes which cases the
pair shares; ``-0.0`` counted as ``0.0``, NaN payloads ignored); ``values_hash`` = the two row
hashes. The caller serialises writers (the test-set row lock of ``compute``).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation.stats import ScoreMatrix, WilcoxonOptions
from evaluation.stats.wilcoxon import PAIR_TEST_FIELDS, PairTests, pair_tests
from services.db.base import finite_or_none, utcnow
from services.db.models import PairwiseCache

#: bump when the way a raw test is computed changes (every cached row is then recomputed)
PAIR_TEST_VERSION = 1
_INT_FIELDS = ("n_common", "n_nonzero")


def options_key(options: WilcoxonOptions) -> str:
    """Hash of what a raw pair test depends on besides its two rows."""
    settings = {"zero_method": options.zero_method, "continuity": options.correction, "method": options.method,
                "version": PAIR_TEST_VERSION}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def cases_hash(case_ids: Sequence[str]) -> str:
    """Hash of a case axis (ids in order)."""
    return hashlib.blake2b("\x1f".join(map(str, case_ids)).encode(), digest_size=16).hexdigest()


def row_hashes(matrix: ScoreMatrix) -> list[str]:
    """One hash per algorithm of its values on the matrix's case axis (NaN = not scored) and the
    metric's direction (the tests are one-sided in it: a flipped direction must never reuse them)."""
    values = np.where(np.isnan(matrix.values), np.nan, matrix.values) + 0.0  # one NaN, no -0.0
    direction = b"higher" if matrix.higher_is_better else b"lower"
    return [hashlib.blake2b(direction + np.ascontiguousarray(row).tobytes(), digest_size=16).hexdigest()
            for row in values]


def _tests_from_rows(rows: Sequence[tuple]) -> PairTests:
    if not rows:
        return PairTests(**{name: np.zeros(0, dtype=np.int64 if name in _INT_FIELDS else np.float64)
                            for name in PAIR_TEST_FIELDS})
    table = np.array(rows, dtype=object)
    table[table == None] = np.nan  # noqa: E711 (elementwise: a NULL column is no test)
    table = table.astype(np.float64)
    return PairTests(**{name: table[:, i].astype(np.int64) if name in _INT_FIELDS else table[:, i]
                        for i, name in enumerate(PAIR_TEST_FIELDS)})


def _gather(parts: PairTests, where: np.ndarray, into: dict[str, np.ndarray]) -> None:
    for name in PAIR_TEST_FIELDS:
        into[name][where] = getattr(parts, name)


class FreshPairs:
    """The raw tests of every pair, computed (no cache): what :func:`compute.comparative_rows`
    uses when it is not handed a :class:`PairCache`."""

    def __init__(self, options: WilcoxonOptions, chunk_pairs: int = 64) -> None:
        self.options, self.chunk_pairs = options, chunk_pairs
        self.reused = 0
        self.computed = 0
        self._lock = threading.Lock()  # comparative_rows tests several matrices at once

    def prepare(self) -> None:
        """Nothing to read (the interface of :meth:`PairCache.prepare`)."""

    def pair_tests(self, matrix: ScoreMatrix) -> PairTests:
        ii, jj = np.triu_indices(matrix.n_algorithms, 1)
        with self._lock:
            self.computed += int(ii.size)
        return pair_tests(matrix, ii, jj, self.options, self.chunk_pairs)


class PairCache:
    """Raw pair tests of one (test set, protocol, Wilcoxon options), from the cache or computed.

    ``reuse=False`` (a full recomputation) ignores and replaces every stored row of the test set
    and protocol. :meth:`pair_tests` answers; :meth:`flush` writes what was computed and
    :meth:`prune` drops what no scope used. ``reused`` and ``computed`` count pairs.

    A pair may have several rows, one per values hash: the organ ``average`` of the
    ``all-organs`` rule depends on which organs the other submissions scored, so the two scopes
    can ask for different values of the same pair; each keeps its own row.
    """

    def __init__(self, session: Session, testset_id: int, protocol_key: str, options: WilcoxonOptions, *,
                 reuse: bool = True, chunk_pairs: int = 64) -> None:
        self.session, self.testset_id, self.protocol_key = session, testset_id, protocol_key
        self.options, self.reuse, self.chunk_pairs = options, reuse, chunk_pairs
        self.options_key = options_key(options)
        self.reused = 0
        self.computed = 0
        # (organ, metric, cases_hash) -> {(a, b, values_hash): (row id or None, row tuple of PAIR_TEST_FIELDS)}
        self._known: dict[tuple[str, str, str], dict[tuple[int, int, str], tuple[int | None, tuple]]] = {}
        self._used: set[int] = set()  # ids of the stored rows some matrix asked for
        self._loaded: set[int] = set()
        self._read_all = False
        self._new: list[dict] = []
        self._lock = threading.Lock()
        if not reuse:
            self._delete(sa.true())

    def _delete(self, condition) -> None:
        self.session.execute(sa.delete(PairwiseCache).where(
            PairwiseCache.testset_id == self.testset_id, PairwiseCache.protocol_key == self.protocol_key, condition))

    def prepare(self) -> None:
        """Read the stored rows now, in the calling thread: ``comparative_rows`` calls it before
        its threads start, so the session (a SQLite connection is bound to its thread unless told
        otherwise) is only ever used from the thread that owns it."""
        with self._lock:
            self._read_all_rows()

    def _load(self, organ: str, metric: str, axis: str) -> dict[tuple[int, int, str], tuple[int | None, tuple]]:
        """The stored rows of one matrix's case axis. The first call reads every row of the test
        set, protocol and options in one query (a recomputation asks for every organ and
        metric), so the threads of ``comparative_rows`` never wait on the database."""
        self._read_all_rows()
        return self._known.setdefault((organ, metric, axis), {})

    def _read_all_rows(self) -> None:
        if self.reuse and not self._read_all:
            c = PairwiseCache
            rows = self.session.execute(
                sa.select(c.id, c.organ, c.metric, c.cases_hash, c.submission_a_id, c.submission_b_id, c.values_hash,
                          *(getattr(c, f) for f in PAIR_TEST_FIELDS))
                .where(c.testset_id == self.testset_id, c.protocol_key == self.protocol_key,
                       c.options_key == self.options_key)
            ).all()
            for row in rows:
                self._known.setdefault((row[1], row[2], row[3]), {})[(row[4], row[5], row[6])] = (row[0], tuple(row[7:]))
                self._loaded.add(row[0])
        self._read_all = True

    def pair_tests(self, matrix: ScoreMatrix) -> PairTests:
        """The raw tests of all K(K-1)/2 pairs of ``matrix`` (``numpy.triu_indices`` order; its
        algorithms are submission ids, ascending). Safe from several threads: the cache's state
        (and the session, which only :meth:`_load` touches) is used under a lock, the tests of
        the missing pairs run outside it."""
        k = matrix.n_algorithms
        ii, jj = np.triu_indices(k, 1)
        ids = [int(a) for a in matrix.algorithms]
        if any(x >= y for x, y in zip(ids, ids[1:])):
            raise ValueError("the pairwise cache needs the algorithms in ascending submission id order")
        axis = cases_hash(matrix.case_ids)
        hashes = row_hashes(matrix)
        keys = [(ids[i], ids[j], hashes[i] + hashes[j]) for i, j in zip(ii, jj)]
        out = {name: np.empty(ii.size, dtype=np.int64 if name in _INT_FIELDS else np.float64)
               for name in PAIR_TEST_FIELDS}
        hit = np.zeros(ii.size, dtype=bool)
        cached_rows = []
        with self._lock:
            known = self._load(matrix.organ, matrix.metric, axis)
            for p, key in enumerate(keys):
                entry = known.get(key)
                if entry is not None:
                    hit[p] = True
                    cached_rows.append(entry[1])
                    if entry[0] is not None:
                        self._used.add(entry[0])
        if cached_rows:
            _gather(_tests_from_rows(cached_rows), hit, out)
        miss = np.flatnonzero(~hit)
        if miss.size:
            fresh = pair_tests(matrix, ii[miss], jj[miss], self.options, self.chunk_pairs)
            _gather(fresh, miss, out)
            with self._lock:
                self._record(matrix, axis, [keys[p] for p in miss], fresh, known)
        with self._lock:
            self.reused += int(hit.sum())
            self.computed += int(miss.size)
        return PairTests(**out)

    def _record(self, matrix: ScoreMatrix, axis: str, keys: list[tuple[int, int, str]], fresh: PairTests,
                known: dict) -> None:
        columns = [getattr(fresh, f) for f in PAIR_TEST_FIELDS]
        now = utcnow()
        for p, key in enumerate(keys):
            values = tuple(int(c[p]) if f in _INT_FIELDS else finite_or_none(c[p])
                           for f, c in zip(PAIR_TEST_FIELDS, columns))
            known[key] = (None, values)
            self._new.append({
                "testset_id": self.testset_id, "protocol_key": self.protocol_key, "organ": matrix.organ,
                "metric": matrix.metric, "options_key": self.options_key, "cases_hash": axis,
                "submission_a_id": key[0], "submission_b_id": key[1], "values_hash": key[2],
                "computed_at": now, **dict(zip(PAIR_TEST_FIELDS, values)),
            })

    def flush(self) -> int:
        """Write the computed pairs; returns rows written."""
        written = bulk_insert(self.session, PairwiseCache, self._new)
        self._new = []
        return written

    def prune(self, member_ids: Iterable[int], every_scope: bool) -> None:
        """Drop the rows of other test options and of submissions no longer scored or published;
        with ``every_scope`` (each scope was computed, so every pair still wanted was asked for),
        also the rows no matrix asked for: values or case axes that changed."""
        members = sorted(set(int(i) for i in member_ids))
        self._delete(sa.or_(PairwiseCache.options_key != self.options_key,
                            PairwiseCache.submission_a_id.not_in(members),
                            PairwiseCache.submission_b_id.not_in(members)))
        if every_scope:
            if self.reuse:
                unused = sorted(self._loaded - self._used)
                for start in range(0, len(unused), 5000):
                    self.session.execute(sa.delete(PairwiseCache).where(PairwiseCache.id.in_(unused[start:start + 5000])))
            axes = sorted({axis for _, _, axis in self._known})
            self._delete(PairwiseCache.cases_hash.not_in(axes))


#: one ordered pair of a stored family (:class:`~services.db.leaderboard_models.PairwiseFamily`):
#: submission ids a ("better than") b, the cases both have, V, the one-sided p, the adjusted p,
#: whether it is below alpha, and the mean of x_a - x_b (NaN where there is none)
PAIRWISE_FAMILY_DTYPE = np.dtype([("a", "<i8"), ("b", "<i8"), ("n_common", "<i8"), ("statistic", "<f8"),
                                  ("p_value", "<f8"), ("p_adjusted", "<f8"), ("significant", "u1"),
                                  ("mean_difference", "<f8")])


def pack_family(table) -> bytes:
    """The :func:`evaluation.stats.wilcoxon.pairwise_table` of a matrix whose algorithms are
    submission ids, as the ``data`` of a :class:`~services.db.leaderboard_models.PairwiseFamily`."""
    packed = np.zeros(len(table), dtype=PAIRWISE_FAMILY_DTYPE)
    packed["a"] = table["algorithm"].to_numpy().astype(np.int64)
    packed["b"] = table["opponent"].to_numpy().astype(np.int64)
    for name in ("n_common", "statistic", "p_value", "p_adjusted", "significant", "mean_difference"):
        packed[name] = table[name].to_numpy()
    return packed.tobytes()


def unpack_family(data: bytes) -> list[dict]:
    """The ordered pairs of a stored family as dicts: a, b, n_common, statistic, p_value,
    p_adjusted, significant (bool), mean_difference (None where not finite)."""
    packed = np.frombuffer(data, dtype=PAIRWISE_FAMILY_DTYPE)
    columns = {name: packed[name].tolist() for name in PAIRWISE_FAMILY_DTYPE.names}
    for name in ("statistic", "p_value", "p_adjusted", "mean_difference"):
        columns[name] = [finite_or_none(v) for v in columns[name]]
    columns["significant"] = [bool(v) for v in columns["significant"]]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def bulk_insert(session: Session, model, rows: list[dict]) -> int:
    """Insert ``rows`` (dicts of the model's columns, all with the same keys) in the session's
    transaction: PostgreSQL ``COPY ... FROM STDIN`` (hundreds of thousands of rows per scoring),
    elsewhere one executemany. Floats go as ``repr`` text: exact."""
    if not rows:
        return 0
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        session.execute(sa.insert(model), rows)
        return len(rows)
    columns = list(rows[0])
    table = model.__table__
    dbapi = connection.connection.dbapi_connection
    with dbapi.cursor() as cursor:
        with cursor.copy(f'COPY {table.name} ({", ".join(columns)}) FROM STDIN') as copy:
            buffer = io.StringIO()
            for row in rows:
                buffer.write("\t".join(_copy_text(row[c]) for c in columns))
                buffer.write("\n")
                if buffer.tell() > 1 << 20:
                    copy.write(buffer.getvalue())
                    buffer = io.StringIO()
            copy.write(buffer.getvalue())
    return len(rows)


def _copy_text(value) -> str:
    """One field of COPY's text format (NULL ``\\N``; tab, newline and backslash escaped)."""
    if value is None:
        return "\\N"
    if isinstance(value, (bool, np.bool_)):
        return "t" if value else "f"
    if isinstance(value, float):
        return repr(float(value))  # shortest exact text (np.float64's repr names its type)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\\\x" + bytes(value).hex()  # bytea's hex input, its backslash escaped for COPY
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    text = str(value)
    if any(ch in text for ch in "\\\t\n\r"):
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text
