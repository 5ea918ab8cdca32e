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

Organizers see every number (``scope=all``: the organizer view, in the API, the CLI and the
exports), every group and table carrying ``suppressed: true|false``. The number of hidden cases
behind a stored row is ``n + n_missing`` (scored + unscored cases of the group).
"""

from __future__ import annotations

from typing import Any

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
    """Hidden cases behind an aggregate row: scored plus unscored (``n + n_missing``)."""
    return int(row.get("n") or 0) + int(row.get("n_missing") or 0)


def is_small(n_hidden: int | None, k: int) -> bool:
    return n_hidden is not None and n_hidden < k


def suppress_group(row: dict[str, Any], k: int, viewer_is_organizer: bool, *, n_hidden: int | None = None,
                   fields: tuple[str, ...] = GROUP_STATISTICS) -> dict[str, Any]:
    """A copy of ``row`` with ``suppressed`` set (whether the group has fewer than ``k`` hidden
    cases; ``n_hidden`` defaults to ``n + n_missing``). Suppressed and not an organizer: ``n``
    reads ``"< k"`` and every field of ``fields`` present in the row is ``None``."""
    small = is_small(hidden_cases(row) if n_hidden is None else n_hidden, k)
    out = {**row, "suppressed": small}
    if small and not viewer_is_organizer:
        out["n"] = suppressed_count(k)
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
    return out
