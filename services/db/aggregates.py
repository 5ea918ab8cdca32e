"""Basic per-submission aggregates, computed once from the stored scores and kept in ``aggregates``
so that the leaderboard reads a few hundred rows instead of millions of scores.

For each protocol key, metric m in (dsc, nsd, hd95, assd) and organ o, over the cases with a value:
n, mean, median, std (sample, ddof=1; None when n < 2), n_failed (cases whose status is not ``ok``;
their stored value -- the protocol's worst value -- is included in the statistics). The organ
``average`` is the unweighted mean of the per-organ means (n = organs with a mean). Confidence
intervals are left to the statistics module (``services``/``evaluation.stats``), which overwrites
these rows with richer ones.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.base import utcnow
from services.db.models import Aggregate, Score

METRICS = ("dsc", "nsd", "hd95", "assd")
AVERAGE = "average"


def compute_basic_aggregates(session: Session, submission_id: int) -> int:
    """Replace the submission's ``overall`` aggregates; returns the number of rows written (caller commits)."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    rows = session.execute(
        sa.select(Score.protocol_key, Score.organ, Score.status, Score.dsc, Score.nsd, Score.hd95, Score.assd).where(
            Score.submission_id == submission_id
        )
    )
    for protocol_key, organ, status, *metric_values in rows:
        if status != "ok":
            failed[(protocol_key, organ)] += 1
        for metric, value in zip(METRICS, metric_values):
            if value is not None:
                values[(protocol_key, organ, metric)].append(float(value))
    session.execute(
        sa.delete(Aggregate).where(Aggregate.submission_id == submission_id, Aggregate.scope == "overall")
    )
    now = utcnow()
    new_rows = []
    organ_means: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (protocol_key, organ, metric), xs in sorted(values.items()):
        mean = statistics.fmean(xs)
        organ_means[(protocol_key, metric)].append(mean)
        new_rows.append(
            Aggregate(
                submission_id=submission_id,
                protocol_key=protocol_key,
                organ=organ,
                metric=metric,
                scope="overall",
                group_value="",
                n=len(xs),
                mean=mean,
                median=statistics.median(xs),
                std=statistics.stdev(xs) if len(xs) > 1 else None,
                n_failed=failed[(protocol_key, organ)],
                computed_at=now,
            )
        )
    for (protocol_key, metric), means in sorted(organ_means.items()):
        new_rows.append(
            Aggregate(
                submission_id=submission_id,
                protocol_key=protocol_key,
                organ=AVERAGE,
                metric=metric,
                scope="overall",
                group_value="",
                n=len(means),
                mean=statistics.fmean(means),
                median=statistics.median(means),
                std=statistics.stdev(means) if len(means) > 1 else None,
                n_failed=sum(n for (key, _), n in failed.items() if key == protocol_key),
                computed_at=now,
            )
        )
    session.add_all(new_rows)
    session.flush()
    return len(new_rows)
