"""pairwise_families: the pairwise tests of a leaderboard as one packed family per organ and metric

Revision ID: 0011_pairwise_families
Revises: 0010_lesion_scores
Create Date: 2026-12-02 13:40:00

Holm's adjusted p-values depend on the whole family of ordered pairs, so every new, published or
unpublished submission changed every row of ``pairwise_tests``: 202,000 rows rewritten per update at
100 submissions, most of its time. One blob per (test set, protocol, scope, organ, metric) replaces
them. The rows there are packed into families (their insertion order is the order the statistics
wrote them in), and the downgrade unpacks them again; nothing is recomputed.

The families have no foreign key to the submissions in them (the old rows cascaded): the reader
(``queries.significance``) keeps only the pairs of submissions it shows, and a recomputation
rewrites each family.

The record layout is written out here rather than imported: a migration must keep meaning what it
meant when it was written (the live one is ``services.leaderboard.pairwise.PAIRWISE_FAMILY_DTYPE``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0011_pairwise_families"
down_revision: str | None = "0010_lesion_scores"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
FAMILY_DTYPE = np.dtype([("a", "<i8"), ("b", "<i8"), ("n_common", "<i8"), ("statistic", "<f8"),
                         ("p_value", "<f8"), ("p_adjusted", "<f8"), ("significant", "u1"),
                         ("mean_difference", "<f8")])
KEY = ("testset_id", "protocol_key", "scope", "organ", "metric")
FLOATS = ("statistic", "p_value", "p_adjusted", "mean_difference")


def _families_table() -> None:
    op.create_table(
        "pairwise_families",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("testset_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("organ", sa.String(length=50), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("method", sa.String(length=200), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["testset_id"], ["testsets.id"], name=op.f("fk_pairwise_families_testset_id_testsets"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_families")),
        sa.UniqueConstraint(*KEY, name=op.f("uq_pairwise_families_testset_id_protocol_key_scope_organ_metric")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE pairwise_families ALTER COLUMN data SET STORAGE EXTERNAL")


def _tests_table() -> None:
    op.create_table(
        "pairwise_tests",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("testset_id", sa.Integer(), nullable=False),
        sa.Column("protocol_key", sa.String(length=160), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("organ", sa.String(length=50), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("submission_a_id", sa.Integer(), nullable=False),
        sa.Column("submission_b_id", sa.Integer(), nullable=False),
        sa.Column("n_common", sa.Integer(), nullable=False),
        sa.Column("statistic", sa.Double(), nullable=True),
        sa.Column("p_value", sa.Double(), nullable=True),
        sa.Column("p_adjusted", sa.Double(), nullable=True),
        sa.Column("significant", sa.Boolean(), nullable=False),
        sa.Column("mean_difference", sa.Double(), nullable=True),
        sa.Column("method", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["submission_a_id"], ["submissions.id"],
                                name=op.f("fk_pairwise_tests_submission_a_id_submissions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["submission_b_id"], ["submissions.id"],
                                name=op.f("fk_pairwise_tests_submission_b_id_submissions"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["testset_id"], ["testsets.id"], name=op.f("fk_pairwise_tests_testset_id_testsets"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_tests")),
        sa.UniqueConstraint(
            *KEY, "submission_a_id", "submission_b_id",
            name=op.f("uq_pairwise_tests_testset_id_protocol_key_scope_organ_metric_submission_a_id_submission_b_id"),
        ),
    )
    with op.batch_alter_table("pairwise_tests", schema=None) as batch_op:
        batch_op.create_index("ix_pairwise_tests_a", ["submission_a_id"], unique=False)
        batch_op.create_index("ix_pairwise_tests_b", ["submission_b_id"], unique=False)


def upgrade() -> None:
    _families_table()
    bind = op.get_bind()
    tests = sa.table("pairwise_tests", *(sa.column(c) for c in (
        "id", *KEY, "submission_a_id", "submission_b_id", "n_common", *FLOATS, "significant", "method")))
    families = sa.table("pairwise_families", *(sa.column(c) for c in (
        *KEY, "method", "n_pairs", "data", "computed_at")))
    keys = bind.execute(sa.select(*(tests.c[k] for k in KEY)).distinct()).all()
    now = dt.datetime.now(dt.timezone.utc)
    for key in keys:
        rows = bind.execute(sa.select(tests).where(*(tests.c[k] == v for k, v in zip(KEY, key)))
                            .order_by(tests.c.id)).all()
        packed = np.zeros(len(rows), dtype=FAMILY_DTYPE)
        packed["a"] = [r.submission_a_id for r in rows]
        packed["b"] = [r.submission_b_id for r in rows]
        packed["n_common"] = [r.n_common for r in rows]
        packed["significant"] = [bool(r.significant) for r in rows]
        for name in FLOATS:
            packed[name] = [np.nan if getattr(r, name) is None else getattr(r, name) for r in rows]
        bind.execute(sa.insert(families).values(**dict(zip(KEY, key)), method=rows[0].method, n_pairs=len(rows),
                                                data=packed.tobytes(), computed_at=now))
    with op.batch_alter_table("pairwise_tests", schema=None) as batch_op:
        batch_op.drop_index("ix_pairwise_tests_b")
        batch_op.drop_index("ix_pairwise_tests_a")
    op.drop_table("pairwise_tests")


def downgrade() -> None:
    _tests_table()
    bind = op.get_bind()
    families = sa.table("pairwise_families", *(sa.column(c) for c in (*KEY, "method", "data")))
    tests = sa.table("pairwise_tests", *(sa.column(c) for c in (
        *KEY, "submission_a_id", "submission_b_id", "n_common", *FLOATS, "significant", "method")))
    for family in bind.execute(sa.select(families)).all():
        packed = np.frombuffer(family.data, dtype=FAMILY_DTYPE)
        rows = [{**{k: getattr(family, k) for k in KEY}, "method": family.method,
                 "submission_a_id": int(r["a"]), "submission_b_id": int(r["b"]), "n_common": int(r["n_common"]),
                 "significant": bool(r["significant"]),
                 **{name: (float(r[name]) if np.isfinite(r[name]) else None) for name in FLOATS}} for r in packed]
        if rows:
            bind.execute(sa.insert(tests), rows)
    op.drop_table("pairwise_families")
