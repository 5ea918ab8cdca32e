"""Image ownership: a submission may only run an image its own team supplied.

A team *supplies* an image in exactly two ways:

* it uploads a ``docker save`` tarball (``Submission.image_sha256`` set); validation records the
  image id it loaded (``Submission.image_digest``), so that id is the team's from then on;
* it names a reference in one of the configured registries (``Settings.allowed_registries``); the
  worker pulls it *for that submission* and never resolves it against images already on the engine.

An ``image_ref`` in digest form (``sha256:<64 hex>`` or ``name@sha256:<64 hex>``) is accepted when the
digest is one the team uploaded before. Everything else -- a tag or short id of an image another
team uploaded, another team's digest, an unknown digest, a registry nobody configured -- is refused
with one wording (:data:`REFUSAL`), so a refusal never confirms that another team's image exists.
Image digests stay public on the leaderboard (provenance); this rule makes them useless for running.

Intake (``services/api/intake.py``) and the worker (``worker/runs.py::ensure_image``, before anything runs) both
call :func:`image_ref_allowed` / :func:`team_owns_image`: the second check is defence in depth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.db.models import Submission

#: ``sha256:<hex>`` or ``[registry/]name[:tag]@sha256:<hex>``
_DIGEST = re.compile(r"(?:^|@)(sha256:[a-f0-9]{64})$")

REFUSAL = (
    "image_ref must be the digest (sha256:...) of an image your team uploaded before, or a reference "
    "in one of this service's registries ({registries}); otherwise upload the image with "
    "`docker save IMAGE -o image.tar` and `touchstone submit image.tar`"
)


def digest_of(image_ref: str) -> str | None:
    """The ``sha256:<hex>`` digest an image reference pins, or None for a tag-only reference."""
    match = _DIGEST.search(image_ref)
    return match.group(1) if match else None


def registry_of(image_ref: str) -> str | None:
    """The registry host (``host[:port]``) a reference names, or None when it names none.

    Docker's rule: the first path component is a registry when it contains ``.`` or ``:`` or is
    ``localhost``; ``library/ubuntu`` and ``ubuntu`` name no registry (Docker Hub by default).
    """
    if "/" not in image_ref:
        return None
    first = image_ref.split("/", 1)[0]
    if "." in first or ":" in first or first == "localhost":
        return first
    return None


def in_allowed_registry(image_ref: str, allowed: Sequence[str]) -> bool:
    """True when ``image_ref`` names a registry listed in ``allowed`` (exact host[:port] match)."""
    registry = registry_of(image_ref)
    return registry is not None and registry in {r.strip() for r in allowed if r.strip()}


def team_owns_image(db: Session, team_id: int, image_id: str) -> bool:
    """True when ``team_id`` uploaded (as a tarball) an image whose id is ``image_id``, or the
    worker pulled it from a configured registry for one of that team's submissions.

    Only submissions whose own source produced the digest count: an uploaded tarball
    (``image_sha256``) or a registry pull (``image_ref`` without a digest pin that validation
    resolved). A submission that merely *referred* to a digest never creates ownership.
    """
    query = sa.select(Submission.id).where(
        Submission.team_id == team_id,
        Submission.image_digest == image_id,
        Submission.is_baseline.is_(False),
        sa.or_(Submission.image_sha256.is_not(None), Submission.image_ref.is_not(None)),
    )
    for sub_id in db.scalars(query.limit(50)):
        sub = db.get(Submission, sub_id)
        if sub is None:
            continue
        if sub.image_sha256 is not None:
            return True
        if sub.image_ref is not None and digest_of(sub.image_ref) is None:
            return True  # pulled from a configured registry for this submission
    return False


def image_ref_allowed(db: Session, team_id: int, image_ref: str, allowed_registries: Sequence[str]) -> bool:
    """The intake and worker rule for an ``image_ref`` (see the module docstring)."""
    digest = digest_of(image_ref)
    if digest is not None and team_owns_image(db, team_id, digest):
        return True
    # a configured registry: the worker pulls exactly this reference for this submission
    return in_allowed_registry(image_ref, allowed_registries)


def refusal(allowed_registries: Sequence[str]) -> str:
    """The one wording of a refused ``image_ref`` (names no other team's image)."""
    listed = ", ".join(r for r in allowed_registries if r.strip()) or "none configured"
    return REFUSAL.format(registries=listed)
