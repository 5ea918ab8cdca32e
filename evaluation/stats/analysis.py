"""One call that runs every statistic of one (organ, metric) - what ``finalize`` stores."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from evaluation.stats.power import MddMethod, organ_mdd
from evaluation.stats.ranking import (
    BOOTSTRAP_METHODS,
    RANKING_METHODS,
    RankStability,
    bootstrap_rank_stability,
    compare_rankings,
    rank,
)
from evaluation.stats.scores import ScoreMatrix, apply_missing_policy, json_ready
from evaluation.stats.subgroups import SubgroupAnalysis, subgroup_analysis
from evaluation.stats.summary import summarize
from evaluation.stats.wilcoxon import WilcoxonOptions, pairwise_wilcoxon


@dataclass(frozen=True)
class AnalysisOptions:
    """Every knob of :func:`analyze`, with the defaults the service uses.

    confidence: level of all intervals; n_resamples / seed: both bootstraps (CIs and ranks);
    wilcoxon: signed-rank options (default R-compatible); correction / alpha: multiple testing of
    the pairwise tests and the subgroup Mann-Whitney tests; ranking_methods: rankings computed;
    bootstrap_methods: rankings bootstrapped; fill_missing: value replacing not-scored cases in
    aggregate rankings (None = omit them); subgroup_variables / min_group_size: subgroups;
    mdd_alpha / mdd_power / mdd_method: minimal detectable difference.
    missing_policy: ``None`` (each method's historical rule), ``"worst"`` (missing cases take
    ``worst`` everywhere) or ``"common"`` (rankings and bootstrap on the cases all algorithms
    have; each test on its pair's shared cases; summaries on each algorithm's own cases);
    test_correction: multiple-comparison method of test-then-rank (default: ``correction``);
    family: ``"tested"`` or ``"all"`` ordered pairs counted in m.
    """

    confidence: float = 0.95
    n_resamples: int = 1000
    seed: int = 0
    wilcoxon: WilcoxonOptions = WilcoxonOptions()
    correction: str = "holm"
    alpha: float = 0.05
    ranking_methods: tuple[str, ...] = RANKING_METHODS
    bootstrap_methods: tuple[str, ...] = ("mean",)
    fill_missing: float | None = None
    subgroup_variables: tuple[str, ...] = ()
    min_group_size: int = 10
    mdd_alpha: float = 0.05
    mdd_power: float = 0.8
    mdd_method: MddMethod = "normal"
    missing_policy: str | None = None
    worst: float | None = None
    test_correction: str | None = None
    family: str = "tested"

    def __post_init__(self) -> None:
        bad = [m for m in self.ranking_methods if m not in RANKING_METHODS]
        bad += [m for m in self.bootstrap_methods if m not in BOOTSTRAP_METHODS]
        if bad:
            raise ValueError(
                f"unknown ranking method(s) {bad}; rankings: {list(RANKING_METHODS)}, "
                f"bootstrap: {list(BOOTSTRAP_METHODS)}"
            )


@dataclass(frozen=True, eq=False)
class OrganAnalysis:
    """All statistics of one (organ, metric) of one test set.

    summary: :func:`summarize` table; pairwise: :func:`pairwise_wilcoxon` table; rankings: one
    table with the rows of every method (:data:`RANKING_COLUMNS`); ranking_agreement: Kendall's
    tau between methods; stability: ``{method: RankStability}``; mdd: :func:`organ_mdd` table;
    subgroups: ``{variable: SubgroupAnalysis}``.
    """

    organ: str
    metric: str
    options: AnalysisOptions
    summary: pd.DataFrame
    pairwise: pd.DataFrame
    rankings: pd.DataFrame
    ranking_agreement: pd.DataFrame
    stability: dict[str, RankStability] = field(default_factory=dict)
    mdd: pd.DataFrame | None = None
    subgroups: dict[str, SubgroupAnalysis] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict of everything (NaN -> None)."""
        from dataclasses import asdict

        return json_ready(
            {
                "organ": self.organ,
                "metric": self.metric,
                "options": asdict(self.options),
                "summary": self.summary,
                "pairwise": self.pairwise,
                "rankings": self.rankings,
                "ranking_agreement": self.ranking_agreement,
                "stability": {m: s.to_dict() for m, s in self.stability.items()},
                "mdd": self.mdd,
                "subgroups": {v: s.to_dict() for v, s in self.subgroups.items()},
            }
        )


def analyze(
    scores: ScoreMatrix,
    *,
    case_metadata: pd.DataFrame | None = None,
    options: AnalysisOptions = AnalysisOptions(),
) -> OrganAnalysis:
    """Summaries, pairwise tests, rankings, rank stability, MDD and subgroups of one matrix."""
    described, tested, ranked = scores, scores, scores
    if options.missing_policy == "worst":
        described = tested = ranked = apply_missing_policy(scores, "worst", worst=options.worst)
    elif options.missing_policy == "common":
        ranked = apply_missing_policy(scores, "common")
    elif options.missing_policy is not None:
        apply_missing_policy(scores, options.missing_policy)  # raises: unknown policy
    test_correction = options.test_correction or options.correction
    summary = summarize(
        described, confidence=options.confidence, n_resamples=options.n_resamples, seed=options.seed
    )
    pairwise = pairwise_wilcoxon(
        tested, options=options.wilcoxon, correction=options.correction, alpha=options.alpha,
        family=options.family,
    )
    rankings = {
        m: rank(ranked, m, pairwise=pairwise if ranked is tested else None, fill_missing=options.fill_missing,
                alpha=options.alpha, correction=test_correction, options=options.wilcoxon, family=options.family)
        for m in options.ranking_methods
    }
    scores = ranked
    stability = {}
    if scores.n_cases:
        stability = {
            m: bootstrap_rank_stability(
                scores, m, n_resamples=options.n_resamples, seed=options.seed,
                confidence=options.confidence, fill_missing=options.fill_missing,
            )
            for m in options.bootstrap_methods
        }
    subgroups: dict[str, SubgroupAnalysis] = {}
    if options.subgroup_variables:
        if case_metadata is None:
            raise ValueError("subgroup_variables need case_metadata (a case_id column + variables)")
        subgroups = {
            v: subgroup_analysis(described, case_metadata, v, min_group_size=options.min_group_size,
                                 correction=options.correction, alpha=options.alpha)
            for v in options.subgroup_variables
        }
    return OrganAnalysis(
        organ=scores.organ,
        metric=scores.metric,
        options=options,
        summary=summary,
        pairwise=pairwise,
        rankings=pd.concat(list(rankings.values()), ignore_index=True) if rankings else pd.DataFrame(),
        ranking_agreement=compare_rankings(rankings),
        stability=stability,
        mdd=organ_mdd(scores, alpha=options.mdd_alpha, power=options.mdd_power, method=options.mdd_method),
        subgroups=subgroups,
    )
