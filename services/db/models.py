"""The leaderboard database: SQLAlchemy 2.0 typed models.

Every schema change goes through an Alembic migration in ``migrations/versions`` (linear chain,
readable revision ids ``0001_initial``, ``0002_...``). Units: bytes, seconds; timestamps in UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from services.db.base import Base, BigIntPK, PortableJSON, utcnow
from services.db.enums import RescoreState, Role, ShardState, SubmissionState, enum_column_type

# --------------------------------------------------------------------------------------------
# people
# --------------------------------------------------------------------------------------------


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: bumped by every intake; the UPDATE is the row lock that serialises quota checks (see
    #: services/api/intake.py) on PostgreSQL (row lock) and SQLite (database write lock) alike.
    intake_counter: Mapped[int] = mapped_column(default=0, server_default="0")

    users: Mapped[list[User]] = relationship(back_populates="team")
    algorithms: Mapped[list[Algorithm]] = relationship(back_populates="team")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    role: Mapped[Role] = mapped_column(enum_column_type(Role))
    team_id: Mapped[int | None] = mapped_column(sa.ForeignKey("teams.id", ondelete="RESTRICT"), index=True)
    is_active: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    team: Mapped[Team | None] = relationship(back_populates="users")
    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """A bearer token. Only its sha256 is stored; the plain token is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    #: first characters of the plain token, to tell tokens apart in listings
    prefix: Mapped[str] = mapped_column(sa.String(16))
    label: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]

    user: Mapped[User] = relationship(back_populates="tokens")


# --------------------------------------------------------------------------------------------
# test sets
# --------------------------------------------------------------------------------------------


class TestSet(Base):
    __tablename__ = "testsets"
    __test__ = False  # not a pytest class

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    description: Mapped[str | None] = mapped_column(sa.Text)
    protocol_name: Mapped[str] = mapped_column(sa.String(100))
    protocol_version: Mapped[str] = mapped_column(sa.String(50))
    #: "name@version", the key every Score row names
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    protocol_json: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    manifest_path: Mapped[str | None] = mapped_column(sa.Text)
    #: folder the manifest's relative image/label paths are resolved against
    root_path: Mapped[str] = mapped_column(sa.Text)
    # limits of every container run on this test set
    time_per_case_s: Mapped[float]
    memory_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    gpus: Mapped[int]
    shm_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    pids_limit: Mapped[int]
    shard_size: Mapped[int]
    # quota: at most quota_submissions counting submissions per team per quota_period_days
    quota_submissions: Mapped[int]
    quota_period_days: Mapped[int]
    #: accepting submissions
    is_open: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    #: small-cell suppression (0004_security): a breakdown group with fewer hidden cases than this
    #: shows no statistic to anyone but organizers
    min_group_size: Mapped[int] = mapped_column(default=10, server_default="10")
    # added by 0005_stats_policy: how the statistics treat missing cases ("worst" | "common"), the
    # statistical options (services/leaderboard; {} = the defaults) and the subgroup variables
    # (None = the typed metadata columns)
    missing_policy: Mapped[str] = mapped_column(sa.String(20), default="worst", server_default="worst")
    stats_options: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=sa.text("'{}'"))
    subgroup_variables: Mapped[list[str] | None] = mapped_column(PortableJSON)
    #: added by 0008_rescoring: days the run folders (predictions) of a scored submission are kept
    #: after it was scored, for re-scoring (None: keep all, 0: keep none); `touchstone storage
    #: reclaim` deletes what is older (services/rescoring.py)
    prediction_retention_days: Mapped[int | None]

    cases: Mapped[list[Case]] = relationship(back_populates="testset", order_by="Case.id")


class Case(Base):
    """One CT of a test set. Metadata are typed columns (aggregation by subgroup), the rest in ``extra``."""

    __tablename__ = "cases"
    __table_args__ = (
        sa.UniqueConstraint("testset_id", "case_id"),
        sa.Index("ix_cases_testset_hospital", "testset_id", "hospital"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    case_id: Mapped[str] = mapped_column(sa.String(200))
    hospital: Mapped[str | None] = mapped_column(sa.String(200))
    age: Mapped[int | None]
    sex: Mapped[str | None] = mapped_column(sa.String(20))
    race: Mapped[str | None] = mapped_column(sa.String(100))
    manufacturer: Mapped[str | None] = mapped_column(sa.String(200))
    scanner: Mapped[str | None] = mapped_column(sa.String(200))
    contrast_phase: Mapped[str | None] = mapped_column(sa.String(100))
    diagnosis: Mapped[str | None] = mapped_column(sa.String(200))
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    image_path: Mapped[str] = mapped_column(sa.Text)
    labels_path: Mapped[str] = mapped_column(sa.Text)
    image_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    labels_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    #: part of the public sample: validation runs on these, inventors see their logs and scores
    public_sample: Mapped[bool] = mapped_column(default=False, server_default=sa.false())

    testset: Mapped[TestSet] = relationship(back_populates="cases")


# --------------------------------------------------------------------------------------------
# algorithms and submissions
# --------------------------------------------------------------------------------------------


class Algorithm(Base):
    __tablename__ = "algorithms"
    __table_args__ = (sa.UniqueConstraint("team_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("teams.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    description: Mapped[str | None] = mapped_column(sa.Text)
    paper_url: Mapped[str | None] = mapped_column(sa.Text)
    code_url: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    team: Mapped[Team] = relationship(back_populates="algorithms")
    submissions: Mapped[list[Submission]] = relationship(back_populates="algorithm")


class Submission(Base):
    """One image of one algorithm on one test set. State changes go through services.db.states."""

    __tablename__ = "submissions"
    __table_args__ = (
        sa.Index("ix_submissions_team_received", "team_id", "testset_id", "received_at"),
        sa.Index("ix_submissions_testset_state", "testset_id", "state"),
        sa.Index("ix_submissions_algorithm_sha", "algorithm_id", "image_sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    algorithm_id: Mapped[int] = mapped_column(sa.ForeignKey("algorithms.id", ondelete="RESTRICT"))
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="RESTRICT"))
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("teams.id", ondelete="RESTRICT"))
    submitted_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    state: Mapped[SubmissionState] = mapped_column(
        enum_column_type(SubmissionState), default=SubmissionState.received
    )
    # one timestamp per state (the latest entry into it)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    validating_at: Mapped[dt.datetime | None]
    queued_at: Mapped[dt.datetime | None]
    running_at: Mapped[dt.datetime | None]
    evaluating_at: Mapped[dt.datetime | None]
    scored_at: Mapped[dt.datetime | None]
    published_at: Mapped[dt.datetime | None]
    failed_at: Mapped[dt.datetime | None]
    cancelled_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: why it failed / was cancelled, in words a person can act on
    failure_reason: Mapped[str | None] = mapped_column(sa.Text)
    #: the :class:`services.db.enums.FailureCode` value of that reason (added by 0006_failure_codes)
    failure_code: Mapped[str | None] = mapped_column(sa.String(32))
    #: an image reference (registry) -- or None when the image was uploaded as a tarball
    image_ref: Mapped[str | None] = mapped_column(sa.Text)
    #: the uploaded ``docker save`` tarball, relative to settings.storage_dir
    image_path: Mapped[str | None] = mapped_column(sa.Text)
    #: sha256 (hex) of the uploaded tarball
    image_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    #: docker image id ("sha256:..."), recorded by validation
    image_digest: Mapped[str | None] = mapped_column(sa.String(80))
    image_size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: counts against the team's quota (False once validation fails or for imported baselines)
    counts_against_quota: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    #: logs of the public-sample validation run (inventors may read them)
    validation_log: Mapped[str | None] = mapped_column(sa.Text)
    #: results imported from elsewhere (e.g. the published Touchstone numbers), never run here
    is_baseline: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    #: how many times an organizer asked to run it again
    rerun_count: Mapped[int] = mapped_column(default=0, server_default="0")
    # added by 0004_security
    #: bytes this submission holds in storage now (tarball + kept outputs); a team's sum is capped
    storage_bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    #: when the uploaded tarball was deleted (failed validation past the grace period)
    image_deleted_at: Mapped[dt.datetime | None]
    #: the worker running its validation and that worker's last sign of life (the reaper
    #: re-queues a validation whose heartbeat went stale, like a shard)
    worker_hostname: Mapped[str | None] = mapped_column(sa.String(255))
    heartbeat_at: Mapped[dt.datetime | None]
    validation_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    #: added by 0008_rescoring: when its run folders were deleted under the test set's retention
    #: (it can no longer be re-scored)
    predictions_deleted_at: Mapped[dt.datetime | None]

    algorithm: Mapped[Algorithm] = relationship(back_populates="submissions")
    testset: Mapped[TestSet] = relationship()
    team: Mapped[Team] = relationship()
    submitted_by: Mapped[User | None] = relationship()
    shards: Mapped[list[Shard]] = relationship(back_populates="submission", order_by="Shard.index")


class Shard(Base):
    """One container run over a slice of the test set's cases."""

    __tablename__ = "shards"
    __table_args__ = (sa.UniqueConstraint("submission_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    index: Mapped[int]
    #: the manifest case ids (strings) of this shard
    case_ids: Mapped[list[str]] = mapped_column(default=list)
    state: Mapped[ShardState] = mapped_column(enum_column_type(ShardState), default=ShardState.pending)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    worker_hostname: Mapped[str | None] = mapped_column(sa.String(255))
    container_id: Mapped[str | None] = mapped_column(sa.String(128))
    started_at: Mapped[dt.datetime | None]
    #: last sign of life of the worker running this shard (the reaper retries a stale one)
    heartbeat_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    #: seconds the container of the latest attempt ran (container compute time)
    run_seconds: Mapped[float | None]
    exit_code: Mapped[int | None]
    peak_memory_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    gpu_memory_peak_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    #: integral of GPU memory over time (byte-seconds)
    gpu_memory_auc: Mapped[float | None]
    failure_reason: Mapped[str | None] = mapped_column(sa.Text)
    #: the :class:`services.db.enums.FailureCode` value of a failed shard's reason (0006_failure_codes)
    failure_code: Mapped[str | None] = mapped_column(sa.String(32))
    log_tail: Mapped[str | None] = mapped_column(sa.Text)

    submission: Mapped[Submission] = relationship(back_populates="shards")


class CaseRun(Base):
    """Inference of one case in one submission (wall time and outcome)."""

    __tablename__ = "case_runs"
    __table_args__ = (sa.UniqueConstraint("submission_id", "case_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    case_id: Mapped[int] = mapped_column(sa.ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    shard_id: Mapped[int | None] = mapped_column(sa.ForeignKey("shards.id", ondelete="SET NULL"))
    wall_seconds: Mapped[float | None]
    #: ok | timeout | missing_output | error
    status: Mapped[str] = mapped_column(sa.String(32))
    detail: Mapped[str | None] = mapped_column(sa.Text)
    #: seconds spent scoring this case (all organs)
    scoring_seconds: Mapped[float | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Score(Base):
    """One case x organ x protocol of one submission. The unique key makes scoring idempotent."""

    __tablename__ = "scores"
    __table_args__ = (
        sa.UniqueConstraint("submission_id", "case_id", "organ", "protocol_key"),
        # aggregation: per submission (hence per test set) x protocol x organ
        sa.Index("ix_scores_submission_protocol_organ", "submission_id", "protocol_key", "organ"),
        sa.Index("ix_scores_case", "case_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    case_id: Mapped[int] = mapped_column(sa.ForeignKey("cases.id", ondelete="CASCADE"))
    organ: Mapped[str] = mapped_column(sa.String(50))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    dsc: Mapped[float | None]
    nsd: Mapped[float | None]
    #: mm
    hd95: Mapped[float | None]
    #: mm
    assd: Mapped[float | None]
    # lesion metrics (evaluation.metric_registry.LESION_METRICS): only on a lesion class's row of a
    # ``kind: lesion`` protocol, NULL elsewhere
    lesion_tp: Mapped[float | None]
    lesion_fp: Mapped[float | None]
    lesion_fn: Mapped[float | None]
    lesion_sensitivity: Mapped[float | None]
    lesion_precision: Mapped[float | None]
    lesion_f1: Mapped[float | None]
    lesion_dsc: Mapped[float | None]
    lesion_pq: Mapped[float | None]
    #: an :class:`evaluation.io.ScoreStatus` value (every one but ``ok`` is a failure)
    status: Mapped[str] = mapped_column(sa.String(32), default="ok")
    detail: Mapped[str | None] = mapped_column(sa.Text)


class Lesion(Base):
    """One connected component of truth or prediction of a lesion class's score row
    (:class:`evaluation.lesions.Lesion`; deleted with its score)."""

    __tablename__ = "lesions"
    __table_args__ = (sa.UniqueConstraint("score_id", "side", "component"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    score_id: Mapped[int] = mapped_column(BigIntPK, sa.ForeignKey("scores.id", ondelete="CASCADE"))
    #: ``truth`` or ``prediction``
    side: Mapped[str] = mapped_column(sa.String(16))
    #: the component's number on its side (1-based)
    component: Mapped[int]
    voxels: Mapped[int] = mapped_column(sa.BigInteger)
    volume_mm3: Mapped[float]
    #: diameter of the ball of that volume
    diameter_mm: Mapped[float]
    #: the matched component on the other side (None: unmatched)
    matched_to: Mapped[int | None]
    iou: Mapped[float]
    dsc: Mapped[float]


class Aggregate(Base):
    """A summary statistic of one submission's scores, computed once after scoring.

    ``organ`` is an organ name or ``"average"``; ``scope`` is ``overall``, ``hospital``, ``subgroup``...
    and ``group_value`` names the group (``""`` for overall).
    """

    __tablename__ = "aggregates"
    __table_args__ = (
        sa.UniqueConstraint("submission_id", "protocol_key", "organ", "metric", "scope", "group_value"),
        sa.Index("ix_aggregates_board", "protocol_key", "scope", "metric", "organ"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    organ: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(20))
    scope: Mapped[str] = mapped_column(sa.String(50), default="overall")
    group_value: Mapped[str] = mapped_column(sa.String(200), default="")
    n: Mapped[int]
    mean: Mapped[float | None]
    median: Mapped[float | None]
    std: Mapped[float | None]
    ci_low: Mapped[float | None]
    ci_high: Mapped[float | None]
    n_failed: Mapped[int] = mapped_column(default=0)
    computed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # added by 0002_leaderboard: ci_low/ci_high are the mean's percentile bootstrap interval; these
    # the median's, and the test set's cases without a score
    median_ci_low: Mapped[float | None]
    median_ci_high: Mapped[float | None]
    n_missing: Mapped[int] = mapped_column(default=0, server_default="0")
    # added by 0005_stats_policy: fewer cases than the test set's min_group_size; the interval method
    too_small: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    ci_method: Mapped[str | None] = mapped_column(sa.String(20))
    # added by 0009_withheld: blanked for non-organizers by the small-cell rule decided across every
    # breakdown (services/leaderboard/suppression.py withheld_groups); NULL: computed before it
    withheld: Mapped[bool | None]


# deliberately like Aggregate above and the tables of services/db/leaderboard_models.py: the same key and
# statistic columns, each table spelled out as its migration (0007_pairwise_cache) created it.

class PairwiseCache(Base):
    """The raw result of one paired Wilcoxon signed-rank test of two submissions on one organ and
    metric (0007_pairwise_cache), kept so that a recomputation re-tests only the pairs whose inputs
    changed (``services/leaderboard/pairwise.py``). One row per unordered pair (a < b) holds both
    one-sided results; the multiple-comparison correction is never cached (it depends on the family).

    Reused only when all of its key matches: the pair, organ, metric, protocol, the test options
    (``options_key``), the case axis it was tested on (``cases_hash``: under the ``common`` policy
    the cases every ranked submission has) and ``values_hash``, the hash of both submissions' values
    on that axis (which fixes their common cases and catches a rescoring). Rows nothing asks for
    any more are pruned by the next recomputation.
    """

    __tablename__ = "pairwise_cache"
    __table_args__ = (
        sa.UniqueConstraint("testset_id", "protocol_key", "organ", "metric", "options_key", "cases_hash",
                            "submission_a_id", "submission_b_id", "values_hash", name="uq_pairwise_cache_key"),
        sa.Index("ix_pairwise_cache_b", "submission_b_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    organ: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(20))
    options_key: Mapped[str] = mapped_column(sa.String(64))
    cases_hash: Mapped[str] = mapped_column(sa.String(64))
    #: the lower submission id of the pair ("a"), then the higher ("b")
    submission_a_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    submission_b_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    values_hash: Mapped[str] = mapped_column(sa.String(64))
    n_common: Mapped[int]
    n_nonzero: Mapped[int]
    #: V of d = a - b (oriented scores) and of b - a; z of a - b; one-sided p of "a better", "b better"
    statistic: Mapped[float | None]
    statistic_less: Mapped[float | None]
    z: Mapped[float | None]
    p_greater: Mapped[float | None]
    p_less: Mapped[float | None]
    #: of the raw metric values x_a - x_b on the common cases (metric units; sd with ddof 1)
    mean_difference: Mapped[float | None]
    median_difference: Mapped[float | None]
    sd_difference: Mapped[float | None]
    computed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PackedScores(Base):
    """One submission's scores on the hidden cases under one protocol, packed for the statistics
    (0007_pairwise_cache): a recomputation reads K blobs instead of K x cases x organs score rows
    (``services/leaderboard/pairwise.py``). Derived from ``scores``; rebuilt whenever the submission
    is scored, published or unpublished (``on_submission_scored``) and by a full recomputation.

    ``data``: little-endian records (case pk int32, organ index int16 into ``organs``, dsc float64,
    nsd float64, failed uint8), NaN where a metric has no value.
    """

    __tablename__ = "packed_scores"
    __table_args__ = (sa.UniqueConstraint("submission_id", "protocol_key", name="uq_packed_scores_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(sa.ForeignKey("submissions.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    organs: Mapped[list[str]] = mapped_column(PortableJSON, default=list)
    n_scores: Mapped[int]
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    computed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TestSetProtocol(Base):
    """A protocol version of a test set other than the one it was imported with (0008_rescoring):
    the full description its scores were made under. The test set's own protocol stays in
    ``TestSet.protocol_json``; scores, aggregates and statistics name ``protocol_key``."""

    __tablename__ = "testset_protocols"
    __table_args__ = (sa.UniqueConstraint("testset_id", "protocol_key"),)
    __test__ = False

    id: Mapped[int] = mapped_column(primary_key=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    protocol_json: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: evaluation.protocols.Protocol.content_hash: one key never names two descriptions
    content_hash: Mapped[str] = mapped_column(sa.String(64))
    created_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RescoreJob(Base):
    """Scoring kept predictions of a test set's submissions under another protocol version
    (0008_rescoring; worker/rescoring.py). The counters are the job's progress."""

    __tablename__ = "rescore_jobs"
    __table_args__ = (sa.Index("ix_rescore_jobs_testset", "testset_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    testset_id: Mapped[int] = mapped_column(sa.ForeignKey("testsets.id", ondelete="CASCADE"))
    protocol_key: Mapped[str] = mapped_column(sa.String(160))
    state: Mapped[RescoreState] = mapped_column(enum_column_type(RescoreState), default=RescoreState.queued)
    #: the submissions to score (their predictions were all there when the job was made)
    submission_ids: Mapped[list[int]] = mapped_column(PortableJSON, default=list)
    #: [{"submission_id", "reason"}]: asked for (or in scope) but not re-scorable, and why
    unavailable: Mapped[list[dict[str, Any]]] = mapped_column(PortableJSON, default=list)
    n_cases_total: Mapped[int] = mapped_column(default=0)
    n_cases_done: Mapped[int] = mapped_column(default=0)
    n_scores_written: Mapped[int] = mapped_column(default=0)
    #: why the job failed
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_by_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class AuditLog(Base):
    """Who did what to what (organizer actions, intake decisions)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    actor_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"), index=True)
    action: Mapped[str] = mapped_column(sa.String(100))
    target: Mapped[str | None] = mapped_column(sa.String(200))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


# the leaderboard statistics tables (services/leaderboard owns them) share this metadata
from services.db.leaderboard_models import PairwiseFamily, RankingEntry, RankStability, StatsRun  # noqa: E402, F401
