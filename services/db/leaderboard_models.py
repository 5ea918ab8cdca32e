"""Tables of the leaderboard statistics (owned by ``services/leaderboard``; migration 0002_leaderboard).

The per-submission summaries live in :class:`services.db.models.Aggregate`. The tables here hold the
statistics that depend on *which* submissions are compared, so every row names its ``scope``:

* ``all`` -- every scored or published submission of the test set (the organizers' view);
* ``published`` -- only published submissions (imported baselines included): what the public,
  analysts and inventors see.

Every row is keyed by the test set and the protocol version (``protocol_key`` = "name@version")
whose scores it summarises; a recomputation replaces the rows of one (test set, protocol, scope).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from services.db.base import Base, BigIntPK, PortableJSON, utcnow

#: the two scopes of the comparative statistics
SCOPES = ("published", "all")


class StatsRun(Base):
    """One recomputation of one (test set, protocol, scope, organ, metric): what went in, when.

    ``details`` holds the settings (bootstrap resamples, seed, confidence, correction, alpha) and the
    Kendall's tau summary of each bootstrapped ranking method.
    """

    __tablename__ = "stats_runs"
    __table_args__ = (sa.UniqueConstraint("testset_id", "protocol_key", "scope", "organ", "metric"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    scope: Mapped[str] = mapped_column(sa.String(20))
    organ: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(20))
    n_submissions: Mapped[int]
    n_cases: Mapped[int]
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    computed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# The key columns (test set, protocol, scope, organ, metric[, method, submission]) repeat in every table
# here and in services.db.models.PairwiseCache deliberately: each table spells out its own columns as
# its migration created them (no mixin whose column order or constraints could drift from the schema).

class RankingEntry(Base):
    """Rank of one submission by one method (mean, median, rank-mean, test) within a scope."""

    __tablename__ = "ranking_entries"
    __table_args__ = (
        sa.UniqueConstraint("testset_id", "protocol_key", "scope", "organ", "metric", "method", "submission_id"),
        sa.Index("ix_ranking_entries_submission", "submission_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    scope: Mapped[str] = mapped_column(sa.String(20))
    organ: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(20))
    method: Mapped[str] = mapped_column(sa.String(20))
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    #: the ranked quantity: mean / median score, mean per-case rank, or share of significant wins
    value: Mapped[float | None]
    rank: Mapped[int]


class PairwiseFamily(Base):
    """Every one-sided paired Wilcoxon signed-rank test "A better than B" of one (test set,
    protocol, scope, organ, metric) on their common cases, as one packed family (0011_pairwise_families).

    One blob per family instead of one row per ordered pair: Holm's adjusted p-values depend on the
    whole family, so every new, republished or unpublished submission changes all K(K-1) of them,
    and rewriting 200,000 rows was most of a leaderboard update at 100 submissions. ``data``:
    little-endian records of :data:`services.leaderboard.pairwise.PAIRWISE_FAMILY_DTYPE`
    (submission a, submission b, n_common, statistic, p_value, p_adjusted, significant,
    mean_difference; NaN = none), one per ordered pair, in ranking-input order;
    :func:`services.leaderboard.pairwise.unpack_family` reads it.
    """

    __tablename__ = "pairwise_families"
    __table_args__ = (sa.UniqueConstraint("testset_id", "protocol_key", "scope", "organ", "metric"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    scope: Mapped[str] = mapped_column(sa.String(20))
    organ: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(20))
    #: e.g. "wilcoxon signed-rank, paired, one-sided (...); holm over all ordered pairs with a test"
    method: Mapped[str] = mapped_column(sa.String(200))
    n_pairs: Mapped[int]
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    computed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RankStability(Base):
    """Bootstrap rank distribution of one submission for one ranking method within a scope."""

    __tablename__ = "rank_stability"
    __table_args__ = (
        sa.UniqueConstraint("testset_id", "protocol_key", "scope", "organ", "metric", "method", "submission_id"),
        sa.Index("ix_rank_stability_submission", "submission_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    scope: Mapped[str] = mapped_column(sa.String(20))
    organ: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(20))
    method: Mapped[str] = mapped_column(sa.String(20))
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    full_rank: Mapped[int]
    mean_rank: Mapped[float]
    median_rank: Mapped[float]
    rank_ci_low: Mapped[float]
    rank_ci_high: Mapped[float]
    #: share of bootstrap samples in which it ranks first
    p_best: Mapped[float]
    #: rank_counts[r - 1] = bootstrap samples in which it has rank r (r = 1..K)
    rank_counts: Mapped[list[int]] = mapped_column(PortableJSON, default=list)
    n_resamples: Mapped[int]


__all__ = ["PairwiseFamily", "RankStability", "RankingEntry", "SCOPES", "StatsRun"]
