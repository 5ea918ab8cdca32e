"""Small-cell suppression: THE rule, applied once by the read side (:mod:`.queries`,
:mod:`services.exports`), so the API, the pages, the CLI and the exports print the same thing.

A statistic computed over fewer than ``k`` hidden cases (``TestSet.min_group_size``; cases of the
public sample do not count) would let anyone read hidden per-case scores back: the mean of a
group of one case is that case's score, the CI bounds of a group of two are both values. So, for
everyone but organizers:

* a **group** (a hospital, a subgroup of any breakdown variable) with fewer than ``k`` hidden cases
  keeps its name, but its count reads ``"< k"`` and every statistic of it (mean, median, std,
  CI bounds, n_failed, n_missing) is ``None``;
* a **test set** with fewer than ``k`` hidden cases has its whole leaderboard suppressed the same
  way (overall statistics, ranks and rank values, pairwise tests, rank stability): an overall
  mean over one hidden case *is* that case's score.

* **across breakdowns** (decided when the statistics are computed, :func:`withheld_groups`, and
  stored as ``Aggregate.withheld``): the groups of two variables nest (hospital A inside
  manufacturer GE), so ``n_GE·mean_GE − n_A·mean_A`` is the sum of the cases of GE outside A even
  when every group in sight is large. Every published ``n·mean`` is a linear form of the hidden
  per-case scores; the rule is that no such combination of the visible groups (every breakdown
  variable of the submission, organ and metric, plus the overall row) equals the sum over a set of
  fewer than ``k`` cases that is a *cell* (cases alike in every variable) or a suppressed group.
* **complementary suppression**: blanking the small groups alone is not enough, since the overall
  statistic minus the visible groups gives them back (``N·mean − Σ n_g·mean_g``). Within one
  breakdown (one submission, variable, organ, metric) the suppressed groups together must hold at
  least ``k`` hidden cases: when they do not, the smallest visible groups are suppressed too, until
  they do (:func:`groups_to_suppress`). Such a group of ``k`` or more is blanked the same way; its
  count reads ``"suppressed"`` (its count would give the small groups' count back).

Organizers see every number (``scope=all``: the organizer view, in the API, the CLI and the
exports), every group and table carrying ``suppressed: true|false``. The number of hidden cases
behind a stored row is its ``n``: the values its statistics are computed over.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

#: the statistics of an aggregate row (breakdown group or overall summary) that suppression blanks
GROUP_STATISTICS: tuple[str, ...] = (
    "n_failed", "n_missing", "mean", "median", "std", "mean_ci_low", "mean_ci_high", "median_ci_low",
    "median_ci_high",
)
#: further score-derived fields of a leaderboard entry blanked when the whole test set is too small
ENTRY_STATISTICS: tuple[str, ...] = ("rank", "value", "rank_median", "rank_ci_low", "rank_ci_high", "p_best")


def suppressed_count(k: int) -> str:
    """What a suppressed group's count reads: ``"< 10"`` for ``k = 10``."""
    return f"< {int(k)}"


def reveals(scope: str) -> bool:
    """Whether a read in ``scope`` is the organizers' view (``scope=all``: only organizers may ask
    for it in the API; the CLI reads the database directly, like an organizer)."""
    return scope == "all"


def hidden_cases(row: dict[str, Any]) -> int:
    """Hidden cases behind an aggregate row's statistics: the values its mean is taken over
    (``n``; under the ``worst`` policy that includes missing cases filled with the worst value).
    Not ``n + n_missing``: under the ``common`` policy a group of 1 scored and 20 missing cases
    has a mean over one case."""
    return int(row.get("n") or 0)


def is_small(n_hidden: int | None, k: int) -> bool:
    return n_hidden is not None and n_hidden < k


#: what the count of a group suppressed only as the complement of small groups reads
COMPLEMENT_COUNT = "suppressed"


def groups_to_suppress(hidden: dict[str, int], k: int) -> set[str]:
    """The groups of one breakdown (group → hidden cases) to suppress: every group with fewer
    than ``k`` hidden cases and, while those hold fewer than ``k`` cases together, the smallest
    other groups (ties by name), so that no suppressed group can be computed from the overall
    statistic and the visible groups by subtraction. Empty when no group is small."""
    chosen = {g for g, n in hidden.items() if 0 < n < k}
    if not chosen:
        return set()
    total = sum(hidden[g] for g in chosen)
    for group in sorted((g for g in hidden if g not in chosen and hidden[g] > 0), key=lambda g: (hidden[g], g)):
        if total >= k:
            break
        chosen.add(group)
        total += hidden[group]
    return chosen


def _span_basis(sets: np.ndarray) -> np.ndarray:
    """An orthonormal basis (columns) of the space spanned by the rows of ``sets`` (a 0/1 matrix
    groups x cells): the left singular vectors of ``sets^T`` above numpy's rank tolerance."""
    u, singular, _ = np.linalg.svd(sets.T.astype(float), full_matrices=False)
    tol = singular.max(initial=0.0) * max(sets.shape) * np.finfo(float).eps
    return u[:, : int((singular > tol).sum())]


def _in_span(basis: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Which rows ``t`` of ``targets`` are linear combinations of the rows the basis spans: the
    residual of the orthogonal projection, ``|t|^2 - |B^T t|^2``, is zero (0/1 vectors: to 1e-9)."""
    if not len(targets):
        return np.zeros(0, dtype=bool)
    t = targets.astype(float)
    return (t * t).sum(axis=1) - ((t @ basis) ** 2).sum(axis=1) < 1e-9


#: results of :func:`withheld_groups` by a digest of its inputs: under the ``worst`` policy every
#: submission of a test set has the same counted cases, so one organ's answer serves them all
_WITHHELD_CACHE: dict[bytes, frozenset] = {}


def withheld_groups(counted: np.ndarray, groups: Mapping[Hashable, np.ndarray], k: int) -> set[Hashable]:
    """The groups (keys of ``groups``: boolean masks over the cases, e.g. ``(variable, group)``)
    that non-organizers must not see for one submission, organ and metric, so that no hidden
    score sum over fewer than ``k`` cases can be computed from the visible ``n·mean`` values.

    ``counted`` marks the cases the overall statistic is taken over (its ``n``); a group's cases
    are ``mask & counted``. Decided in this order:

    1. every group with ``0 < n < k`` and, per variable (the first element of a tuple key), the
       complement rule of :func:`groups_to_suppress`;
    2. while a *target* -- a cell (the counted cases alike in every group), or a suppressed group,
       holding ``0 < n < k`` cases -- is a linear combination of the visible groups and the
       overall row (:func:`_in_span`), the smallest visible group that combination uses
       (least-squares coefficients) is suppressed too (ties by key), and the check is repeated
       (it ends: with the overall row alone visible nothing of fewer than ``k`` cases is spanned).

    The overall row itself is never suppressed here (a test set with fewer than ``k`` hidden
    cases is suppressed whole elsewhere). Exact for sums over one cell or one suppressed group;
    a union of several cells that is no group is not checked on its own. Cost per pass: one thin
    SVD of a cells x (groups + 1) matrix."""
    import hashlib

    counted = np.asarray(counted, dtype=bool)
    masks = {key: np.asarray(mask, dtype=bool) & counted for key, mask in groups.items()}
    digest = hashlib.sha256(repr((int(k), sorted(map(repr, masks)))).encode())
    digest.update(np.packbits(counted).tobytes())
    for key in sorted(masks, key=repr):
        digest.update(np.packbits(masks[key]).tobytes())
    cached = _WITHHELD_CACHE.get(digest.digest())
    if cached is not None:
        return set(cached)
    sizes = {key: int(mask.sum()) for key, mask in masks.items()}
    hidden: set[Hashable] = set()
    by_variable: dict[Hashable, dict[Hashable, int]] = {}
    for key, n in sizes.items():
        by_variable.setdefault(key[0] if isinstance(key, tuple) else None, {})[key] = n
    for block in by_variable.values():
        hidden |= groups_to_suppress(block, k)
    keys = [key for key in masks if sizes[key] > 0]
    if keys and counted.any():
        patterns = np.stack([masks[key][counted] for key in keys], axis=1)
        cells, cell_of = np.unique(patterns, axis=0, return_inverse=True)
        cell_sizes = np.bincount(cell_of.ravel(), minlength=len(cells))
        member = cells.T.astype(np.int8)  # group x cell
        small_cells = np.flatnonzero(cell_sizes < k)
        while True:
            visible = [i for i, key in enumerate(keys) if key not in hidden]
            basis = _span_basis(np.vstack([np.ones((1, len(cells)), dtype=np.int8), member[visible]]))
            # a cell's unit vector is in the span iff its row of the basis has norm 1
            exposed = [np.eye(1, len(cells), int(c), dtype=np.int8)[0] for c in small_cells
                       if 1.0 - float((basis[c] ** 2).sum()) < 1e-9]
            if not exposed:
                small_hidden = [i for i, key in enumerate(keys) if key in hidden and sizes[key] < k]
                flags = _in_span(basis, member[small_hidden]) if small_hidden else np.zeros(0, dtype=bool)
                exposed = [member[i] for i, hit in zip(small_hidden, flags) if hit]
            if not exposed:
                break
            # the visible groups that combination uses (least-squares coefficients; row 0 = overall)
            rows = np.vstack([np.ones((1, len(cells))), member[visible]]).astype(float)
            coefficients = np.linalg.lstsq(rows.T, exposed[0].astype(float), rcond=None)[0][1:]
            used = [i for i, c in zip(visible, coefficients) if abs(c) > 1e-9]
            if not used:  # spanned by the overall row alone: the whole counted set, never < k
                break
            hidden.add(keys[min(used, key=lambda i: (sizes[keys[i]], repr(keys[i])))])
    if len(_WITHHELD_CACHE) > 4096:
        _WITHHELD_CACHE.clear()
    _WITHHELD_CACHE[digest.digest()] = frozenset(hidden)
    return hidden


def suppress_breakdown(rows: list[dict[str, Any]], k: int, viewer_is_organizer: bool,
                       key=lambda row: (row.get("submission_id"), row.get("variable"), row.get("organ"),
                                        row.get("metric"))) -> list[dict[str, Any]]:
    """:func:`suppress_group` over the rows of breakdowns, with complementary suppression decided
    per breakdown (rows sharing ``key``; each row names its ``group``)."""
    blocks: dict[Any, dict[str, int]] = {}
    for row in rows:
        blocks.setdefault(key(row), {})[row["group"]] = hidden_cases(row)
    hide = {block: groups_to_suppress(hidden, k) for block, hidden in blocks.items()}
    # ``withheld``: decided across every breakdown when the statistics were computed (None: rows
    # computed before 0009_withheld, which get the per-breakdown rule only)
    return [suppress_group(row, k, viewer_is_organizer,
                           complement=row["group"] in hide[key(row)] or bool(row.get("withheld")))
            for row in rows]


def suppress_group(row: dict[str, Any], k: int, viewer_is_organizer: bool, *, n_hidden: int | None = None,
                   fields: tuple[str, ...] = GROUP_STATISTICS, complement: bool = False) -> dict[str, Any]:
    """A copy of ``row`` with ``suppressed`` set (the group has fewer than ``k`` hidden cases --
    ``n_hidden`` defaults to ``n + n_missing`` -- or ``complement``: it is suppressed to protect
    small groups of the same breakdown). Suppressed and not an organizer: ``n`` reads ``"< k"``
    (``"suppressed"`` for a complement group) and every field of ``fields`` in the row is ``None``."""
    tiny = is_small(hidden_cases(row) if n_hidden is None else n_hidden, k)
    small = tiny or complement
    out = {**row, "suppressed": small}
    if small and not viewer_is_organizer:
        out["n"] = suppressed_count(k) if tiny else COMPLEMENT_COUNT
        for name in fields:
            if name in out:
                out[name] = None
    return out


def suppress_entry(entry: dict[str, Any], k: int) -> dict[str, Any]:
    """A leaderboard entry of a test set with fewer than ``k`` hidden cases, as non-organizers see
    it: who it is (label, team, state, image, efficiency), no score-derived number."""
    out = suppress_group(entry, k, False, n_hidden=0, fields=GROUP_STATISTICS + ENTRY_STATISTICS)
    if "organs" in out:
        out["organs"] = {}
    if "n_scored" in out:
        out["n_scored"] = suppressed_count(k)
    return out
