"""Image ownership and failed-run accounting at intake (issue: the third-party guarantee).

A team may only run an image it supplied: another team's digest (in any spelling), a local tag or
short id, or an unconfigured registry is refused with the *same* words as an unknown digest, so the
refusal never confirms that another team's image exists. An identical tarball that already failed
validation is refused, failed validations are rate-limited, and a team's storage is capped --
on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from services.db import images
from services.db.enums import SubmissionState
from services.db.models import Submission
from services.db.session import create_db_engine

TEAM_B_DIGEST = "sha256:" + "b" * 64
UNKNOWN_DIGEST = "sha256:" + "9" * 64


def _post(client, world, form, who="inv_a", fields=None, image=None):
    algorithm = "algo-b" if who == "inv_b" else "algo-a"
    fields = {"algorithm": algorithm, "testset": "ts1", **(fields or {})}
    return client.post("/api/v1/submissions", headers=world["headers"][who], **form(fields, image))


def _update(world, submission_id: int, **values) -> None:
    engine = create_db_engine(str(world["settings"].database_url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.update(Submission).where(Submission.id == submission_id).values(**values))
    engine.dispose()


def _validated_upload(client, world, form, image_tar, who: str, digest: str, tag: str) -> int:
    """Upload a tarball as ``who`` and record the digest its validation found."""
    response = _post(client, world, form, who=who, image=image_tar(tag=tag))
    assert response.status_code == 202, response.text
    sub_id = response.json()["id"]
    _update(world, sub_id, image_digest=digest, state=SubmissionState.scored)
    return sub_id


def test_another_teams_image_is_refused_like_an_unknown_one(client, world, form, image_tar, sent_tasks):
    _validated_upload(client, world, form, image_tar, "inv_b", TEAM_B_DIGEST, "team-b-image")
    unknown = _post(client, world, form, fields={"image_ref": UNKNOWN_DIGEST})
    assert unknown.status_code == 422
    wording = unknown.json()["detail"]
    assert wording == images.refusal(world["settings"].allowed_registries)
    for spelling in (TEAM_B_DIGEST, f"team-b/seg@{TEAM_B_DIGEST}", f"algo0:team-b-image@{TEAM_B_DIGEST}",
                     "algo0:team-b-image", "touchstone/example-trivial:latest", "b" * 12):
        response = _post(client, world, form, fields={"image_ref": spelling})
        assert response.status_code == 422, (spelling, response.text)
        assert response.json()["detail"] == wording, spelling
    # nothing was stored for team A, and team B's digest is not echoed anywhere
    assert "b" * 64 not in wording
    assert [name for name, *_ in sent_tasks].count("touchstone.validate") == 1  # team B's upload only


def test_own_uploaded_digest_is_accepted(client, world, form, image_tar, sent_tasks):
    own = "sha256:" + "a" * 64
    _validated_upload(client, world, form, image_tar, "inv_a", own, "team-a-image")
    response = _post(client, world, form, fields={"image_ref": f"team-a/seg@{own}"})
    assert response.status_code == 202, response.text
    # a teammate of the same team may use it too; the other team may not
    assert _post(client, world, form, who="inv_a2", fields={"image_ref": own}).status_code == 202
    assert _post(client, world, form, who="inv_b", fields={"image_ref": own}).status_code == 422


def test_referring_to_a_digest_creates_no_ownership(client, world, form, image_tar, sent_tasks):
    """A submission that only *named* a digest never makes that digest the team's."""
    own = "sha256:" + "c" * 64
    _validated_upload(client, world, form, image_tar, "inv_a", own, "a-only")
    referred = _post(client, world, form, fields={"image_ref": own})
    assert referred.status_code == 202
    engine = create_db_engine(str(world["settings"].database_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn, sa.orm.Session(bind=conn) as session:
        team_b = session.scalar(sa.text("select id from teams where name = 'team-b'"))
        assert not images.team_owns_image(session, team_b, own)
    engine.dispose()


def test_registry_references_only_from_configured_registries(client, world, form, sent_tasks):
    world["settings"].allowed_registries = ["registry.example.org"]
    assert _post(client, world, form, fields={"image_ref": "registry.example.org/team-a/seg:2"}).status_code == 202
    for ref in ("other.example.org/team-a/seg:2", "team-a/seg:2", "localhost/seg:2", "seg"):
        response = _post(client, world, form, fields={"image_ref": ref})
        assert response.status_code == 422, ref
        assert response.json()["detail"] == images.refusal(["registry.example.org"])


def test_identical_tarball_after_failed_validation_is_refused(client, world, form, image_tar, sent_tasks):
    body = image_tar(tag="fails")
    first = _post(client, world, form, image=body)
    assert first.status_code == 202
    _update(world, first.json()["id"], state=SubmissionState.failed, failed_at=dt.datetime.now(dt.timezone.utc),
            failure_reason="Validation on the public sample failed: the algorithm wrote nothing",
            counts_against_quota=False)
    again = _post(client, world, form, image=body)
    assert again.status_code == 409
    assert f"submission {first.json()['id']}" in again.json()["detail"] and "wrote nothing" in again.json()["detail"]
    # a changed image is welcome
    assert _post(client, world, form, image=image_tar(tag="fixed")).status_code == 202


def test_failed_validations_are_rate_limited(client, world, form, image_tar, sent_tasks):
    world["settings"].failed_validations_per_day = 2
    for i in range(2):
        response = _post(client, world, form, image=image_tar(tag=f"bad{i}"))
        assert response.status_code == 202
        _update(world, response.json()["id"], state=SubmissionState.failed, counts_against_quota=False,
                failed_at=dt.datetime.now(dt.timezone.utc))
    refused = _post(client, world, form, image=image_tar(tag="bad2"))
    assert refused.status_code == 429
    assert "failed validations" in refused.json()["detail"]
    # the other team is not affected
    assert _post(client, world, form, who="inv_b", image=image_tar(tag="b-ok")).status_code == 202


def test_storage_is_recorded_and_capped_per_team(client, world, form, image_tar, sent_tasks, settings):
    from pathlib import Path

    body = image_tar(tag="big", layer_bytes=20_000)
    first = _post(client, world, form, image=body)
    assert first.status_code == 202
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        stored = conn.scalar(sa.select(Submission.storage_bytes).where(Submission.id == first.json()["id"]))
    engine.dispose()
    assert stored == len(body)
    settings.max_team_storage_bytes = len(body) + 100
    files_before = sorted(p for p in Path(settings.storage_dir).rglob("*") if p.is_file())
    over = _post(client, world, form, image=image_tar(tag="big2", layer_bytes=20_000))
    assert over.status_code == 413 and "cap" in over.json()["detail"]
    assert sorted(p for p in Path(settings.storage_dir).rglob("*") if p.is_file()) == files_before
    assert _post(client, world, form, who="inv_b", image=image_tar(tag="b", layer_bytes=20_000)).status_code == 202
    # organizers see each team's storage; the submission shows its own
    teams = client.get("/api/v1/teams", headers=world["headers"]["org"]).json()
    by_name = {t["name"]: t["storage_bytes"] for t in teams}
    assert by_name["team-a"] == len(body) and by_name["team-b"] > 0
    assert client.get("/api/v1/teams", headers=world["headers"]["inv_a"]).status_code == 403
    mine = client.get(f"/api/v1/submissions/{first.json()['id']}", headers=world["headers"]["inv_a"]).json()
    assert mine["storage_bytes"] == len(body)
