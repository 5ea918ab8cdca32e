"""The leaderboard service: stored statistics of every test set (write side :mod:`.compute`, read
side :mod:`.queries`). ``finalize`` calls :func:`on_submission_scored` after scoring; the API calls
it on publish and unpublish. See docs/leaderboard.md."""

from services.leaderboard.compute import (
    DEFAULT_OPTIONS,
    BOARD_METRICS,
    RANKING_METHODS,
    STABILITY_METHODS,
    STATS_PRESETS,
    RecomputeReport,
    StatsOptions,
    breakdown_variables,
    normalize_stats_options,
    on_submission_scored,
    options_for_testset,
    recompute_all,
    recompute_testset,
)

__all__ = [
    "DEFAULT_OPTIONS", "BOARD_METRICS", "RANKING_METHODS", "RecomputeReport", "STABILITY_METHODS", "StatsOptions",
    "on_submission_scored", "recompute_testset", "recompute_all", "options_for_testset", "STATS_PRESETS",
    "normalize_stats_options", "breakdown_variables",
]
