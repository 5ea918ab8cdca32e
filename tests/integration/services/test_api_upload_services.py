"""Submission intake through the API: accepted uploads, every refused kind of upload (with the right
status and nothing left in storage), quota and duplicates -- on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import sqlalchemy as sa

from services.db.models import Submission
from services.db.session import create_db_engine
from services.db.states import transition


def _stored_files(settings) -> list[Path]:
    return [p for p in Path(settings.storage_dir).rglob("*") if p.is_file()]


def _post(client, world, form, who="inv_a", fields=None, image=None, **kw):
    fields = {"algorithm": "algo-a", "testset": "ts1", **(fields or {})}
    return client.post("/api/v1/submissions", headers=world["headers"][who], **form(fields, image), **kw)


def test_upload_is_stored_received_and_enqueued(client, world, form, image_tar, sent_tasks, settings):
    import hashlib

    body = image_tar(tag="one")
    response = _post(client, world, form, image=body)
    assert response.status_code == 202, response.text
    sub = response.json()
    assert sub["state"] == "received" and sub["team"] == "team-a" and sub["algorithm"] == "algo-a"
    assert sub["image_sha256"] == hashlib.sha256(body).hexdigest()
    assert sub["image_size_bytes"] == len(body)
    assert sent_tasks == [("touchstone.validate", [sub["id"]], "cpu")]
    files = _stored_files(settings)
    assert len(files) == 1 and files[0].read_bytes() == body


def test_image_reference_submission(client, world, form, sent_tasks):
    response = _post(client, world, form, fields={"image_ref": "registry.example.org/team-a/seg:1.0"})
    assert response.status_code == 202, response.text
    assert response.json()["image_ref"] == "registry.example.org/team-a/seg:1.0"
    assert _post(client, world, form, fields={"image_ref": "registry.example.org/team-a/seg:1.0"}).status_code == 409
    bad = _post(client, world, form, fields={"image_ref": "Not A Ref!"})
    assert bad.status_code == 422 and "reference" in bad.json()["detail"]


def _truncated(image_tar) -> bytes:
    body = image_tar(layer_bytes=5000)
    return body[: len(body) // 2]


def _plain_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    return buffer.getvalue()


def _traversal() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in [("../../etc/evil", b"x"), ("manifest.json", b'[{"Config":"c","Layers":[]}]')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_bad_uploads_are_refused_and_nothing_is_kept(client, world, form, image_tar, sent_tasks, settings):
    cases = {
        "not a tar": (b"hello, this is not a tar archive" * 100, 422, "not a readable tar"),
        "zero bytes": (b"", 422, "empty"),
        "truncated": (_truncated(image_tar), 422, "truncated"),
        "two images": (image_tar(images=2), 422, "2 images"),
        "zero images": (image_tar(images=0), 422, "0 images"),
        "no manifest.json": (_plain_tar(), 422, "no manifest.json"),
        "path traversal": (_traversal(), 422, "unsafe member name"),
        "over the limit": (b"\0" * (settings.max_upload_bytes + 1), 413, "size limit"),
    }
    for label, (body, status, words) in cases.items():
        response = _post(client, world, form, image=body)
        assert response.status_code == status, (label, response.text)
        assert words in response.json()["detail"], (label, response.json())
    assert sent_tasks == []
    assert _stored_files(settings) == []
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count(Submission.id))) == 0
    engine.dispose()


def test_request_shape_errors(client, world, form, image_tar):
    headers = world["headers"]["inv_a"]
    assert client.post("/api/v1/submissions", headers=headers, content=b"raw").status_code == 415
    both = _post(client, world, form, fields={"image_ref": "a/b:1"}, image=image_tar())
    assert both.status_code == 422 and "exactly one" in both.json()["detail"]
    neither = _post(client, world, form)
    assert neither.status_code == 422
    assert _post(client, world, form, fields={"algorithm": "nope"}, image=image_tar()).status_code == 404
    assert _post(client, world, form, fields={"testset": "nope"}, image=image_tar()).status_code == 404
    # another team's algorithm is not yours: 404, not a submission in their name
    assert _post(client, world, form, fields={"algorithm": "algo-b"}, image=image_tar()).status_code == 404
    unknown = _post(client, world, form, fields={"colour": "red"}, image=image_tar())
    assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]
    big_header = {**headers, "Content-Length": str(10 * 1024**3)}
    early = client.post("/api/v1/submissions", headers={**big_header, "Content-Type": "multipart/form-data; boundary=x"},
                        content=b"")
    assert early.status_code == 413
    broken = client.post("/api/v1/submissions",
                         headers={**headers, "Content-Type": "multipart/form-data; boundary=zzz"},
                         content=b"--zzz\r\nContent-Disposition: form-data; name=\"algorithm\"\r\n\r\nalgo-a")
    assert broken.status_code == 422 and "ended early" in broken.json()["detail"]


def test_duplicate_image_for_the_algorithm_is_409(client, world, form, image_tar, settings):
    body = image_tar(tag="dup")
    first = _post(client, world, form, image=body)
    assert first.status_code == 202
    again = _post(client, world, form, who="inv_a2", image=body)
    assert again.status_code == 409 and str(first.json()["id"]) in again.json()["detail"]
    assert len(_stored_files(settings)) == 1  # the refused copy was removed


def test_quota_counts_and_failed_validations_do_not(client, world, form, image_tar, settings):
    org = world["headers"]["org"]
    assert client.patch("/api/v1/testsets/ts1", headers=org, json={"quota_submissions": 2}).status_code == 200
    ids = [_post(client, world, form, image=image_tar(tag=f"q{i}")).json()["id"] for i in range(2)]
    third = _post(client, world, form, image=image_tar(tag="q2"))
    assert third.status_code == 429 and "2 of 2" in third.json()["detail"]
    # team B is not affected by team A's quota
    assert _post(client, world, form, who="inv_b", fields={"algorithm": "algo-b"}, image=image_tar(tag="b")).status_code == 202
    # a failed validation gives the slot back
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        submission = session.get(Submission, ids[0])
        transition(submission, "validating")
        transition(submission, "failed", "the image does not write /output")
        session.commit()
    engine.dispose()
    assert _post(client, world, form, image=image_tar(tag="q3")).status_code == 202
    assert _post(client, world, form, image=image_tar(tag="q4")).status_code == 429


def test_closed_testset_is_409(client, world, form, image_tar):
    org = world["headers"]["org"]
    assert client.patch("/api/v1/testsets/ts1", headers=org, json={"is_open": False}).status_code == 200
    response = _post(client, world, form, image=image_tar())
    assert response.status_code == 409 and "closed" in response.json()["detail"]


def test_inventor_reads_own_submission_and_logs(client, world, form, image_tar):
    sub = _post(client, world, form, image=image_tar()).json()
    mine = client.get(f"/api/v1/submissions/{sub['id']}", headers=world["headers"]["inv_a2"])
    assert mine.status_code == 200 and mine.json()["state"] == "received"
    logs = client.get(f"/api/v1/submissions/{sub['id']}/logs", headers=world["headers"]["inv_a"])
    assert logs.status_code == 200 and logs.json()["validation_log"] is None
    assert client.get(f"/api/v1/submissions/{sub['id']}", headers=world["headers"]["inv_b"]).status_code == 404


def test_nul_in_a_form_field_and_an_overlong_boundary_are_4xx(client, world, form, image_tar, settings):
    """Found by attack: NUL in a text field was a 500 on PostgreSQL (text cannot hold it), a
    boundary over 256 characters a 500 everywhere (the parser's own error)."""
    for field in ("algorithm", "testset", "team", "image_ref"):
        response = _post(client, world, form, fields={field: "a\x00b"}, image=None if field == "image_ref" else image_tar())
        assert response.status_code == 422, (field, response.text)
        assert "NUL" in response.json()["detail"]
    body = b"--" + b"z" * 300 + b"--\r\n"
    for boundary in ("z" * 300, "z" * 71):
        response = client.post("/api/v1/submissions", content=body, headers={
            **world["headers"]["inv_a"], "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 415, response.text
    assert _stored_files(settings) == []
