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


def suppress_breakdown(rows: list[dict[str, Any]], k: int, viewer_is_organizer: bool,
                       key=lambda row: (row.get("submission_id"), row.get("variable"), row.get("organ"),
                                        row.get("metric"))) -> list[dict[str, Any]]:
    """:func:`suppress_group` over the rows of breakdowns, with complementary suppression decided
    per breakdown (rows sharing ``key``; each row names its ``group``)."""
    blocks: dict[Any, dict[str, int]] = {}
    for row in rows:
        blocks.setdefault(key(row), {})[row["group"]] = hidden_cases(row)
    hide = {block: groups_to_suppress(hidden, k) for block, hidden in blocks.items()}
    return [suppress_group(row, k, viewer_is_organizer, complement=row["group"] in hide[key(row)]) for row in rows]


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
