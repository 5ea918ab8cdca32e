"""Statistics of a benchmark: summaries with bootstrap intervals, paired Wilcoxon tests, rankings
and their bootstrap stability, subgroups, minimal detectable differences.

Pure functions on :class:`ScoreMatrix` (algorithms x cases, one organ and metric); no database.
See ``docs/statistics.md`` for the methods, formulas and the API.
"""

from evaluation.stats.analysis import AnalysisOptions, OrganAnalysis, analyze
from evaluation.stats.power import minimal_detectable_difference, organ_mdd
from evaluation.stats.ranking import (
    BOOTSTRAP_METHODS,
    RANKING_COLUMNS,
    RANKING_METHODS,
    TIE_RTOL,
    TIE_RULE,
    RankStability,
    aggregate_then_rank,
    bootstrap_rank_stability,
    case_ranks,
    compare_rankings,
    kendall_tau_b,
    min_ranks,
    rank,
    rank_then_aggregate,
    test_then_rank,
)
from evaluation.stats.scores import (
    AVERAGE_ORGAN,
    HIGHER_IS_BETTER,
    MISSING_POLICIES,
    ORGAN_AVERAGE_RULES,
    ScoreMatrix,
    apply_missing_policy,
    average_over_organs,
    expected_cases,
    higher_is_better,
    json_ready,
    score_matrices_from_long,
)
from evaluation.stats.subgroups import (
    SUBGROUP_VARIABLES,
    UNKNOWN_GROUP,
    SubgroupAnalysis,
    age_decade,
    subgroup_analysis,
)
from evaluation.stats.summary import SUMMARY_COLUMNS, bootstrap_intervals, summarize
from evaluation.stats.wilcoxon import (
    CORRECTIONS,
    FAMILIES,
    PAIRWISE_COLUMNS,
    WilcoxonOptions,
    adjust_pvalues,
    pairwise_wilcoxon,
    pvalue_matrix,
    signed_rank_test,
)

__all__ = [
    "AVERAGE_ORGAN", "AnalysisOptions", "BOOTSTRAP_METHODS", "CORRECTIONS", "HIGHER_IS_BETTER",
    "OrganAnalysis", "PAIRWISE_COLUMNS", "RANKING_COLUMNS", "RANKING_METHODS", "RankStability",
    "SUBGROUP_VARIABLES", "SUMMARY_COLUMNS", "ScoreMatrix", "SubgroupAnalysis", "UNKNOWN_GROUP",
    "WilcoxonOptions", "adjust_pvalues", "age_decade", "aggregate_then_rank", "analyze",
    "average_over_organs", "bootstrap_intervals", "bootstrap_rank_stability", "case_ranks",
    "compare_rankings", "higher_is_better", "json_ready", "kendall_tau_b", "min_ranks",
    "minimal_detectable_difference", "organ_mdd", "pairwise_wilcoxon", "pvalue_matrix", "rank",
    "rank_then_aggregate", "score_matrices_from_long", "signed_rank_test", "subgroup_analysis",
    "summarize", "test_then_rank", "MISSING_POLICIES", "ORGAN_AVERAGE_RULES", "apply_missing_policy",
    "expected_cases", "TIE_RTOL", "TIE_RULE", "FAMILIES",
]
