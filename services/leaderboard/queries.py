"""Read the stored leaderboard statistics (the read side: API, web pages and CLI share these).

Every function reads precomputed rows (aggregates, rankings, pairwise tests, rank stability) and
returns plain JSON-ready dicts, so the API, the pages and ``touchstone leaderboard --format json``
print the same numbers. Visibility is decided by the caller through ``scope``: ``published``
(anyone) or ``all`` (organizers only); rows of a submission whose state left the scope since the
last recomputation are filtered out here as well.

Small-cell suppression (:mod:`.suppression`) is applied here, after the cache, for every reader:
outside ``scope=all`` a group with fewer than ``TestSet.min_group_size`` hidden cases shows no
statistic, and neither does anything of a test set with fewer hidden cases than that.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from evaluation.labels import ORGANS
from services.db.leaderboard_models import SCOPES, PairwiseFamily, RankingEntry, RankStability, StatsRun
from services.db.models import Aggregate, Algorithm, Case, CaseRun, Shard, Submission, Team, TestSet
from services.leaderboard import compute, suppression, versions
from services.leaderboard.pairwise import unpack_family
from services.lru import LruCache
from services.leaderboard.compute import (
    BREAKDOWNS,
    ORGANS_AND_AVERAGE,
    RANKING_METHODS,
    SCOPE_STATES,
    STABILITY_METHODS,
)

#: what each ranking method's ``value`` is
METHOD_VALUE = {
    "mean": "mean score",
    "median": "median score",
    "rank-mean": "mean per-case rank (lower is better)",
    "test": "share of significant wins over the others",
}


class LeaderboardNotFound(LookupError):
    """A test set or submission that does not exist (or is not visible in the scope)."""


class LeaderboardQueryError(ValueError):
    """A bad parameter (the message lists the valid values)."""


def check_params(organ: str | None = None, metric: str | None = None, method: str | None = None,
                 scope: str | None = None, variable: str | None = None, stability_method: str | None = None,
                 testset: TestSet | None = None) -> None:
    """Raise :class:`LeaderboardQueryError` naming the valid values for a bad parameter. With a
    ``testset``, its protocol decides the metrics (:func:`compute.board_metrics`: the lesion
    metrics only for a lesion protocol) and adds its lesion classes to the organs."""
    checks = (
        ("organ", organ, (*ORGANS_AND_AVERAGE, *compute.lesion_classes(testset)) if testset else ORGANS_AND_AVERAGE),
        ("metric", metric, compute.board_metrics(testset)),
        ("method", method, RANKING_METHODS),
        ("scope", scope, SCOPES),
        ("variable", variable, BREAKDOWNS),
        ("method", stability_method, STABILITY_METHODS),
    )
    for name, value, allowed in checks:
        if value is not None and value not in allowed:
            where = f" for test set {testset.name!r} (protocol {testset.protocol_key})" if testset is not None else ""
            raise LeaderboardQueryError(f"unknown {name} {value!r}{where}; choose one of {', '.join(allowed)}")


def get_testset(session: Session, name: str, protocol: str | None = None) -> TestSet:
    """The test set ``name``, seen under its protocol version ``protocol`` ("name@version"; default
    its current one): every read below then uses that version's scores and statistics."""
    testset = session.scalar(sa.select(TestSet).where(TestSet.name == name))
    if testset is None:
        raise LeaderboardNotFound(f"no test set named {name!r}")
    try:
        return versions.under_protocol(session, testset, protocol)  # type: ignore[return-value]
    except versions.UnknownProtocolVersion as exc:
        raise LeaderboardNotFound(str(exc)) from None


def list_testsets(session: Session, scope: str = "published") -> list[dict[str, Any]]:
    check_params(scope=scope)
    counts = dict(
        session.execute(
            sa.select(Submission.testset_id, sa.func.count(Submission.id))
            .where(Submission.state.in_(SCOPE_STATES[scope]))
            .group_by(Submission.testset_id)
        ).all()
    )
    out = []
    for ts in session.scalars(sa.select(TestSet).order_by(TestSet.name)):
        n_cases = session.scalar(sa.select(sa.func.count(Case.id)).where(Case.testset_id == ts.id))
        out.append({"testset": ts.name, "description": ts.description, "protocol_key": ts.protocol_key,
                    "protocol_versions": versions.protocol_keys(session, ts),
                    "n_cases": n_cases or 0, "n_submissions": counts.get(ts.id, 0)})
    return out


def _submission_info(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    """id -> algorithm, team, label (algorithm name, "#id" added when one algorithm has several
    submissions among ``ids``), is_baseline, state, image digest."""
    if not ids:
        return {}
    rows = session.execute(
        sa.select(Submission.id, Algorithm.name, Team.name, Submission.is_baseline, Submission.state,
                  Submission.image_digest, Submission.image_sha256, Submission.algorithm_id)
        .join(Algorithm, Algorithm.id == Submission.algorithm_id)
        .join(Team, Team.id == Submission.team_id)
        .where(Submission.id.in_(ids))
    ).all()
    per_algorithm: dict[int, int] = defaultdict(int)
    for row in rows:
        per_algorithm[row[7]] += 1
    info = {}
    for sid, algorithm, team, is_baseline, state, digest, sha, algorithm_id in rows:
        label = algorithm if per_algorithm[algorithm_id] == 1 else f"{algorithm} #{sid}"
        info[sid] = {"submission_id": sid, "algorithm": algorithm, "team": team, "label": label,
                     "is_baseline": bool(is_baseline), "state": state.value, "image_digest": digest or sha}
    return info


def _in_scope(session: Session, testset: TestSet, scope: str) -> set[int]:
    return set(
        session.scalars(
            sa.select(Submission.id).where(
                Submission.testset_id == testset.id, Submission.state.in_(SCOPE_STATES[scope])
            )
        )
    )


def n_hidden_cases(session: Session, testset: TestSet, run: dict[str, Any] | None = None) -> int:
    """Hidden (not public-sample) cases of the test set; with a stats run's info, the smaller of
    that and the run's case count (the cases its statistics were computed over)."""
    n = session.scalar(
        sa.select(sa.func.count(Case.id)).where(Case.testset_id == testset.id, Case.public_sample.is_(False))
    ) or 0
    if run and run.get("n_cases") is not None:
        n = min(n, int(run["n_cases"]))
    return int(n)


def min_group_size(testset: TestSet) -> int:
    """The test set's small-cell threshold k (``testsets.min_group_size``)."""
    return int(testset.min_group_size or 1)


def efficiency(session: Session, ids: list[int]) -> dict[int, dict[str, float | None]]:
    """Per submission: mean wall seconds per case (cases that ran, CaseRun.wall_seconds), peak GPU
    memory (bytes, max over shards, NVML) and peak memory (bytes). None where not measured
    (imported baselines, CPU-only runs)."""
    out: dict[int, dict[str, float | None]] = {i: {"seconds_per_case": None, "gpu_memory_peak_bytes": None,
                                                   "memory_peak_bytes": None} for i in ids}
    if not ids:
        return out
    for sid, seconds in session.execute(
        sa.select(CaseRun.submission_id, sa.func.avg(CaseRun.wall_seconds))
        .where(CaseRun.submission_id.in_(ids), CaseRun.wall_seconds.is_not(None))
        .group_by(CaseRun.submission_id)
    ):
        out[sid]["seconds_per_case"] = float(seconds) if seconds is not None else None
    for sid, gpu, mem in session.execute(
        sa.select(Shard.submission_id, sa.func.max(Shard.gpu_memory_peak_bytes), sa.func.max(Shard.peak_memory_bytes))
        .where(Shard.submission_id.in_(ids))
        .group_by(Shard.submission_id)
    ):
        out[sid]["gpu_memory_peak_bytes"] = int(gpu) if gpu is not None else None
        out[sid]["memory_peak_bytes"] = int(mem) if mem is not None else None
    return out


def _run_info(session: Session, testset: TestSet, scope: str, organ: str, metric: str) -> dict[str, Any] | None:
    run = session.scalar(
        sa.select(StatsRun).where(
            StatsRun.testset_id == testset.id, StatsRun.protocol_key == testset.protocol_key,
            StatsRun.scope == scope, StatsRun.organ == organ, StatsRun.metric == metric,
        )
    )
    if run is None:
        return None
    return {"computed_at": run.computed_at.isoformat(), "n_submissions": run.n_submissions, "n_cases": run.n_cases,
            **run.details}


def _agg_dict(a: Aggregate) -> dict[str, Any]:
    return {"n": a.n, "n_failed": a.n_failed, "n_missing": a.n_missing, "mean": a.mean, "median": a.median,
            "std": a.std, "mean_ci_low": a.ci_low, "mean_ci_high": a.ci_high,
            "median_ci_low": a.median_ci_low, "median_ci_high": a.median_ci_high,
            "too_small": a.too_small, "withheld": a.withheld, "ci_method": a.ci_method}


# In-process cache of built leaderboard tables (the API's and the pages' hot read).
#
# A table is a pure function of the stored statistics, which every recomputation replaces (new
# ``stats_runs`` rows: new ids and ``computed_at``), and of which submissions are in scope now.
# The key holds both -- the newest run's (id, computed_at) of the (test set, protocol, scope)
# and the in-scope submission ids -- so a recomputation, a publication or any state change is
# seen by the next request, in every process. What no recomputation touches (algorithm and
# team names, efficiency columns) is re-read after at most 60 s (ttl_s). Values are shared: callers
# must not mutate them.
BOARD_CACHE = LruCache(max_entries=256, ttl_s=60.0)


def _stats_version(session: Session, testset: TestSet, scope: str) -> tuple:
    """(newest stats run id, its computed_at) of the test set's protocol and scope: changes with
    every recomputation (rows are replaced, never updated in place)."""
    run_id, computed_at = session.execute(
        sa.select(sa.func.max(StatsRun.id), sa.func.max(StatsRun.computed_at)).where(
            StatsRun.testset_id == testset.id, StatsRun.protocol_key == testset.protocol_key,
            StatsRun.scope == scope,
        )
    ).one()
    return run_id, computed_at.isoformat() if computed_at is not None else None


def leaderboard(
    session: Session, testset: TestSet, *, organ: str = "average", metric: str = "dsc", method: str = "mean",
    scope: str = "published",
) -> dict[str, Any]:
    """The ranked table of one organ (or the average), metric and ranking method (cached, see
    :data:`BOARD_CACHE`; the result is shared and must not be mutated).

    Each entry: rank, value (what the method ranks, see :data:`METHOD_VALUE`), the submission
    (label, algorithm, team, is_baseline, state), its summary of this organ/metric (n, mean,
    median, std, CIs, n_failed, n_missing), the mean of every organ, its bootstrap rank
    stability (median rank and interval; for method ``test``/``median`` those of ``mean``), and
    the efficiency columns. ``suppressed``: the test set has fewer than ``min_group_size`` hidden
    cases; outside ``scope=all`` its entries then carry no score-derived number (ordered by label).
    """
    board = _cached_board(session, testset, organ=organ, metric=metric, method=method, scope=scope)
    k = min_group_size(testset)
    small = suppression.is_small(n_hidden_cases(session, testset, board["run"]), k)
    out = {**board, "min_group_size": k, "suppressed": small}
    if small and not suppression.reveals(scope):
        out["entries"] = sorted((suppression.suppress_entry(e, k) for e in board["entries"]),
                                key=lambda e: (e["label"], e["submission_id"]))
        out["run"] = _suppress_run(board["run"])
    elif not suppression.reveals(scope):
        # an entry summarising fewer than k hidden cases (an organ few ground truths hold, a
        # baseline with mostly empty cells) is a small cell of its own
        out["entries"] = [
            {**suppression.suppress_group(e, k, False, n_hidden=0, fields=suppression.GROUP_STATISTICS + ("value",)),
             "n_scored": suppression.suppressed_count(k)}
            if isinstance(e.get("n"), int) and suppression.is_small(min(e["n"], e.get("n_scored") or e["n"]), k)
            else e for e in board["entries"]]
    return out


def _suppress_run(run: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if run is None else {**run, "kendall_tau": None}


def _cached_board(
    session: Session, testset: TestSet, *, organ: str, metric: str, method: str, scope: str,
) -> dict[str, Any]:
    """The unsuppressed table of :func:`leaderboard`, from the cache (shared: never mutate)."""
    check_params(organ=organ, metric=metric, method=method, scope=scope, testset=testset)
    visible = _in_scope(session, testset, scope)
    key = (str(session.get_bind().url), testset.id, testset.name, testset.protocol_key, scope, organ, metric, method,
           _stats_version(session, testset, scope), tuple(sorted(visible)))
    board = BOARD_CACHE.get(key)
    if board is None:
        board = _build_leaderboard(session, testset, organ=organ, metric=metric, method=method, scope=scope,
                                   visible=visible)
        BOARD_CACHE.put(key, board)
    return board


def _build_leaderboard(
    session: Session, testset: TestSet, *, organ: str, metric: str, method: str, scope: str, visible: set[int],
) -> dict[str, Any]:
    """The ranked table of one organ (or the average), metric and ranking method (uncached).

    Each entry: rank, value (what the method ranks, see :data:`METHOD_VALUE`), the submission
    (label, algorithm, team, is_baseline, state), its summary of this organ/metric (n, mean,
    median, std, CIs, n_failed, n_missing), the mean of every organ, its bootstrap rank
    stability (median rank and interval; for method ``test``/``median`` those of ``mean``), and
    the efficiency columns.
    """
    key = (RankingEntry.testset_id == testset.id, RankingEntry.protocol_key == testset.protocol_key,
           RankingEntry.scope == scope, RankingEntry.organ == organ, RankingEntry.metric == metric)
    ranking = [r for r in session.scalars(sa.select(RankingEntry).where(*key, RankingEntry.method == method))
               if r.submission_id in visible]
    ids = [r.submission_id for r in ranking]
    info = _submission_info(session, ids)
    aggregates: dict[int, dict[str, Any]] = {}
    organ_means: dict[int, dict[str, float | None]] = defaultdict(dict)
    if ids:
        for a in session.scalars(
            sa.select(Aggregate).where(
                Aggregate.submission_id.in_(ids), Aggregate.protocol_key == testset.protocol_key,
                Aggregate.scope == "overall", Aggregate.metric == metric,
            )
        ):
            organ_means[a.submission_id][a.organ] = a.mean
            if a.organ == organ:
                aggregates[a.submission_id] = _agg_dict(a)
    stability_method = method if method in STABILITY_METHODS else "mean"
    stability = {
        s.submission_id: s
        for s in session.scalars(
            sa.select(RankStability).where(
                RankStability.testset_id == testset.id, RankStability.protocol_key == testset.protocol_key,
                RankStability.scope == scope, RankStability.organ == organ, RankStability.metric == metric,
                RankStability.method == stability_method,
            )
        )
    }
    eff = efficiency(session, ids)
    entries = []
    for r in sorted(ranking, key=lambda r: (r.rank, info[r.submission_id]["label"])):
        s = stability.get(r.submission_id)
        entries.append({
            "rank": r.rank,
            "value": r.value,
            **info[r.submission_id],
            **aggregates.get(r.submission_id, {}),
            "organs": {o: organ_means[r.submission_id].get(o) for o in ORGANS if o in organ_means[r.submission_id]},
            "rank_median": s.median_rank if s else None,
            "rank_ci_low": s.rank_ci_low if s else None,
            "rank_ci_high": s.rank_ci_high if s else None,
            "p_best": s.p_best if s else None,
            **eff[r.submission_id],
        })
    run = _run_info(session, testset, scope, organ, metric)
    # issue 9: n on every row (the cases the ranking compared: the same on every row under the
    # "common" policy; each submission's own scored cases are in run.n_scored), incomplete ones marked
    n_scored = {int(k): v for k, v in ((run or {}).get("n_scored") or {}).items()}
    most = max(n_scored.values(), default=0)
    for e in entries:
        own = n_scored.get(e["submission_id"], e.get("n"))
        # mean, median, SD and CIs describe the submission's own scored cases (n_scored); n is
        # the cases the ranking compared (its value): the same on every row under "common"
        e["n_scored"] = e.get("n")
        if run and run.get("n_ranked") is not None:
            e["n"] = run["n_ranked"]
        e["incomplete"] = bool(own is not None and own < most)
    return {
        "testset": testset.name, "protocol_key": testset.protocol_key, "scope": scope, "organ": organ,
        "metric": metric, "method": method, "value": METHOD_VALUE[method], "stability_method": stability_method,
        "missing_policy": (run or {}).get("missing_policy", testset.missing_policy),
        "statistics": (run or {}).get("footer"),
        "run": run, "entries": entries,
    }


def significance(session: Session, testset: TestSet, *, organ: str = "average", metric: str = "dsc",
                 scope: str = "published") -> dict[str, Any]:
    """Pairwise one-sided Wilcoxon tests: the K x K matrix of Holm-adjusted p-values of "row better
    than column" (algorithms ordered by mean rank) and the list of tests."""
    check_params(organ=organ, metric=metric, scope=scope, testset=testset)
    board = _cached_board(session, testset, organ=organ, metric=metric, method="mean", scope=scope)
    k = min_group_size(testset)
    small = suppression.is_small(n_hidden_cases(session, testset, board["run"]), k)
    order = [e["submission_id"] for e in board["entries"]]
    labels = {e["submission_id"]: e["label"] for e in board["entries"]}
    family = session.execute(
        sa.select(PairwiseFamily.method, PairwiseFamily.data).where(
            PairwiseFamily.testset_id == testset.id, PairwiseFamily.protocol_key == testset.protocol_key,
            PairwiseFamily.scope == scope, PairwiseFamily.organ == organ, PairwiseFamily.metric == metric,
        )
    ).first()
    tests = [t for t in (unpack_family(family.data) if family is not None else [])
             if t["a"] in labels and t["b"] in labels]
    index = {sid: i for i, sid in enumerate(order)}
    p = [[None] * len(order) for _ in order]
    sig = [[False] * len(order) for _ in order]
    pairs = []
    for t in sorted(tests, key=lambda t: (index[t["a"]], index[t["b"]])):
        i, j = index[t["a"]], index[t["b"]]
        p[i][j], sig[i][j] = t["p_adjusted"], t["significant"]
        pairs.append({"a": t["a"], "a_label": labels[t["a"]], "b": t["b"], "b_label": labels[t["b"]],
                      "n_common": t["n_common"], "statistic": t["statistic"], "p_value": t["p_value"],
                      "p_adjusted": t["p_adjusted"], "significant": t["significant"],
                      "mean_difference": t["mean_difference"], "method": family.method})
    run = board["run"] or {}
    if small and not suppression.reveals(scope):
        # fewer hidden cases than k: no test, no difference, not even the order by mean
        order = sorted(order, key=lambda sid: (labels[sid], sid))
        p = [[None] * len(order) for _ in order]
        sig = [[None] * len(order) for _ in order]
        pairs = []
    return {
        "testset": testset.name, "protocol_key": testset.protocol_key, "scope": scope, "organ": organ,
        "metric": metric, "alpha": (run.get("options") or {}).get("alpha"),
        "correction": (run.get("options") or {}).get("correction"), "method": run.get("pairwise_method"),
        "min_group_size": k, "suppressed": small,
        "missing_policy": board["missing_policy"], "statistics": board["statistics"],
        "submissions": [{"submission_id": sid, "label": labels[sid]} for sid in order],
        "p_adjusted": p, "significant": sig, "pairs": pairs,
    }


def stability(session: Session, testset: TestSet, *, organ: str = "average", metric: str = "dsc",
              method: str = "mean", scope: str = "published") -> dict[str, Any]:
    """Bootstrap rank stability per submission (rank distribution, median rank and its interval)
    and the Kendall's tau of the bootstrap rankings against the full one."""
    check_params(organ=organ, metric=metric, scope=scope, stability_method=method, testset=testset)
    visible = _in_scope(session, testset, scope)
    rows = [
        s for s in session.scalars(
            sa.select(RankStability).where(
                RankStability.testset_id == testset.id, RankStability.protocol_key == testset.protocol_key,
                RankStability.scope == scope, RankStability.organ == organ, RankStability.metric == metric,
                RankStability.method == method,
            )
        )
        if s.submission_id in visible
    ]
    info = _submission_info(session, [s.submission_id for s in rows])
    run = _run_info(session, testset, scope, organ, metric) or {}
    k = min_group_size(testset)
    small = suppression.is_small(n_hidden_cases(session, testset, run), k)
    entries = [
        {**info[s.submission_id], "full_rank": s.full_rank, "median_rank": s.median_rank, "mean_rank": s.mean_rank,
         "rank_ci_low": s.rank_ci_low, "rank_ci_high": s.rank_ci_high, "p_best": s.p_best,
         "rank_counts": list(s.rank_counts)}
        for s in sorted(rows, key=lambda s: (s.full_rank, s.mean_rank, s.submission_id))
    ]
    tau = (run.get("kendall_tau") or {}).get(method)
    if small and not suppression.reveals(scope):
        entries = sorted(
            ({**e, **dict.fromkeys(STABILITY_STATISTICS), "rank_counts": []} for e in entries),
            key=lambda e: (e["label"], e["submission_id"]),
        )
        tau = None
    return {
        "testset": testset.name, "protocol_key": testset.protocol_key, "scope": scope, "organ": organ,
        "metric": metric, "method": method, "n_resamples": (run.get("options") or {}).get("n_resamples"),
        "min_group_size": k, "suppressed": small, "kendall_tau": tau, "entries": entries,
    }


#: the numbers of a rank-stability entry, blanked for a test set with fewer than k hidden cases
STABILITY_STATISTICS = ("full_rank", "median_rank", "mean_rank", "rank_ci_low", "rank_ci_high", "p_best")


def breakdown(session: Session, testset: TestSet, *, variable: str = "hospital", organ: str = "average",
              metric: str = "dsc", scope: str = "published", submission_ids: list[int] | None = None) -> dict[str, Any]:
    """Per-group aggregates (hospital or a subgroup variable) of every submission in scope, each
    row with ``suppressed`` (fewer than ``min_group_size`` hidden cases; outside ``scope=all`` such
    a row's ``n`` reads ``"< k"`` and its statistics are ``None``, see :mod:`.suppression`)."""
    check_params(organ=organ, metric=metric, scope=scope, testset=testset)
    from services.leaderboard.compute import breakdown_variables

    if variable not in breakdown_variables(testset):  # the test set's own subgroup variables
        raise LeaderboardQueryError(f"unknown variable {variable!r}; choose one of "
                                    f"{', '.join(breakdown_variables(testset))}")
    visible = _in_scope(session, testset, scope)
    ids = sorted(visible if submission_ids is None else visible & set(submission_ids))
    info = _submission_info(session, ids)
    k, reveal = min_group_size(testset), suppression.reveals(scope)
    rows = []
    if ids:
        for a in session.scalars(
            sa.select(Aggregate).where(
                Aggregate.submission_id.in_(ids), Aggregate.protocol_key == testset.protocol_key,
                Aggregate.scope == variable, Aggregate.organ == organ, Aggregate.metric == metric,
            ).order_by(Aggregate.group_value, Aggregate.submission_id)
        ):
            rows.append({**info[a.submission_id], "group": a.group_value, **_agg_dict(a)})
        rows = suppression.suppress_breakdown(rows, k, reveal, key=lambda row: row["submission_id"])
    return {"testset": testset.name, "protocol_key": testset.protocol_key, "scope": scope, "variable": variable,
            "organ": organ, "metric": metric, "min_group_size": k, "rows": rows}


def submission_summary(session: Session, testset: TestSet, submission: Submission,
                       scopes: tuple[str, ...] = ("published",)) -> dict[str, Any]:
    """Everything stored about one submission's results: overall aggregates per organ x metric,
    its ranks in each scope it belongs to, efficiency. Unless ``scopes`` holds ``all`` (the
    organizers' view), a test set with fewer than ``min_group_size`` hidden cases shows no
    aggregate statistic and no rank (``suppressed``)."""
    info = _submission_info(session, [submission.id])[submission.id]
    k, reveal = min_group_size(testset), "all" in scopes
    small = suppression.is_small(n_hidden_cases(session, testset), k)
    aggregates = [
        # an overall row stands for every hidden case: suppressed exactly when the test set is small
        suppression.suppress_group({"organ": a.organ, "metric": a.metric, **_agg_dict(a)}, k, reveal,
                                   n_hidden=0 if small else None)
        for a in session.scalars(
            sa.select(Aggregate).where(
                Aggregate.submission_id == submission.id, Aggregate.protocol_key == testset.protocol_key,
                Aggregate.scope == "overall",
            )
        )
    ]
    order = {o: i for i, o in enumerate(ORGANS_AND_AVERAGE)}
    aggregates.sort(key=lambda a: (a["metric"], order.get(a["organ"], 99)))
    ranks = [
        {"scope": r.scope, "organ": r.organ, "metric": r.metric, "method": r.method, "rank": r.rank, "value": r.value}
        for r in session.scalars(
            sa.select(RankingEntry).where(
                RankingEntry.submission_id == submission.id, RankingEntry.protocol_key == testset.protocol_key,
                RankingEntry.scope.in_(scopes),
            ).order_by(RankingEntry.scope, RankingEntry.metric, RankingEntry.organ, RankingEntry.method)
        )
    ]
    if small and not reveal:
        ranks = [{**r, "rank": None, "value": None} for r in ranks]
    return {"testset": testset.name, "protocol_key": testset.protocol_key, **info, "min_group_size": k,
            "suppressed": small, "aggregates": aggregates, "ranks": ranks,
            **efficiency(session, [submission.id])[submission.id]}
