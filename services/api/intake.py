"""Submission intake: stream the upload to storage, check it is a ``docker save`` tarball, enforce the
quota and the duplicate rule, store the submission as ``received`` and hand it to the queue.

Streaming: the multipart body is parsed as it arrives (python-multipart's push parser); the file
part goes straight into :class:`services.storage.StreamingWrite` (sha256 and size limit on the fly),
so memory use does not depend on the upload's size and the bytes are written to disk once.

Quota race: the check-and-insert runs in one transaction that *first* updates the team row
(``intake_counter += 1``). On PostgreSQL that UPDATE takes the team's row lock; on SQLite it takes the
database write lock. A concurrent intake for the same team waits at that statement until the first
commits, and (READ COMMITTED / SQLite's serial writers) then counts the committed row: of two uploads
racing for the last slot exactly one is accepted.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import sqlalchemy as sa
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect, Request

from services.api.errors import ApiError
from services.db.base import utcnow
from services.db.enums import SubmissionState
from services.db import images
from services.db.models import Algorithm, AuditLog, Submission, Team, TestSet, User
from services.storage import Storage, StreamingWrite, UploadTooLarge

TEXT_FIELD_LIMIT = 64 * 1024
#: multipart framing allowance on top of max_upload_bytes when judging Content-Length early
MULTIPART_OVERHEAD = 64 * 1024
TEXT_FIELDS = ("algorithm", "testset", "image_ref", "team")
#: docker image reference: [registry[:port]/]path[:tag][@sha256:digest]
IMAGE_REF = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


class IntakeError(ApiError):
    status_code = 422


# -----------------------------------------------------------------------------------------------
# the tarball
# -----------------------------------------------------------------------------------------------
@dataclass
class ImageTarInfo:
    config: str
    layers: list[str]
    repo_tags: list[str] = field(default_factory=list)


def _unsafe_name(name: str) -> bool:
    if not name or "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in PurePosixPath(name.replace("\\", "/")).parts)


def check_docker_save_tar(path: Path) -> ImageTarInfo:
    """Check that ``path`` is a complete, plain ``docker save`` tarball holding exactly one image.

    Refuses (422, with the fix): an empty file; anything that is not a tar; a truncated tar (a member's
    data or the end-of-archive blocks missing); member or link names that are absolute or contain
    ``..``; device files; a ``manifest.json`` that is missing, not JSON, names zero or several images,
    or names a config/layer that is not in the tar.
    """
    hint = "create it with `docker save IMAGE -o image.tar` and upload that file"
    size = path.stat().st_size
    if size == 0:
        raise IntakeError(f"the upload is empty (0 bytes); {hint}")
    try:
        with tarfile.open(path, mode="r:") as archive:
            members = archive.getmembers()
            if not members:
                raise IntakeError(f"the upload is an empty tar archive; {hint}")
            names = set()
            for member in members:
                if _unsafe_name(member.name):
                    raise IntakeError(
                        f"the tar contains an unsafe member name {member.name!r} (absolute or with '..'); {hint}"
                    )
                if member.issym() or member.islnk():
                    target = (
                        posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname))
                        if member.issym()
                        else member.linkname
                    )
                    if member.linkname.startswith("/") or _unsafe_name(target):
                        raise IntakeError(
                            f"the tar contains a link {member.name!r} -> {member.linkname!r} pointing outside "
                            f"the archive; {hint}"
                        )
                if member.isdev() or member.isfifo():
                    raise IntakeError(f"the tar contains a device or fifo {member.name!r}; {hint}")
                if member.isreg() and member.offset_data + member.size > size:
                    raise IntakeError(f"the tar is truncated (member {member.name!r} is cut short); upload it again")
                names.add(member.name[2:] if member.name.startswith("./") else member.name)
            last = members[-1]
            end = last.offset_data + ((last.size + 511) // 512) * 512 if last.isreg() else last.offset_data
            with open(path, "rb") as handle:
                handle.seek(end)
                trailer = handle.read(1024)
            if len(trailer) < 1024 or trailer.strip(b"\x00"):
                raise IntakeError("the tar is truncated (its end-of-archive marker is missing); upload it again")
            manifest_member = next((m for m in members if m.name in ("manifest.json", "./manifest.json")), None)
            if manifest_member is None or not manifest_member.isreg():
                raise IntakeError(f"the tar has no manifest.json, so it is not a `docker save` image; {hint}")
            if manifest_member.size > 1024 * 1024:
                raise IntakeError("the tar's manifest.json is implausibly large (over 1 MiB)")
            extracted = archive.extractfile(manifest_member)
            raw = extracted.read() if extracted is not None else b""
    except tarfile.TarError as exc:
        if "unexpected end" in str(exc) or "truncated" in str(exc):
            raise IntakeError(f"the tar is truncated ({exc}); upload it again") from exc
        raise IntakeError(f"the upload is not a readable tar archive ({exc}); {hint}") from exc
    except (EOFError, OSError) as exc:
        raise IntakeError(f"the tar is truncated or unreadable ({exc}); upload it again") from exc
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise IntakeError(f"the tar's manifest.json is not valid JSON ({type(exc).__name__}); {hint}") from None
    if not isinstance(manifest, list) or not all(isinstance(e, dict) for e in manifest):
        raise IntakeError(f"the tar's manifest.json is not a list of images; {hint}")
    if len(manifest) != 1:
        raise IntakeError(
            f"the tar holds {len(manifest)} images; submit exactly one (`docker save ONE_IMAGE -o image.tar`)"
        )
    entry = manifest[0]
    config, layers = entry.get("Config"), entry.get("Layers")
    if not isinstance(config, str) or not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise IntakeError(f"the tar's manifest.json lacks Config/Layers; {hint}")
    for name in [config, *layers]:
        if _unsafe_name(name):
            raise IntakeError(f"manifest.json names an unsafe path {name!r}")
        if name not in names:
            raise IntakeError(f"manifest.json names {name!r}, which is not in the tar (truncated or edited?); {hint}")
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise IntakeError(f"the tar's manifest.json has RepoTags that are not a list of names; {hint}")
    return ImageTarInfo(config=config, layers=layers, repo_tags=list(tags))


# -----------------------------------------------------------------------------------------------
# streaming multipart
# -----------------------------------------------------------------------------------------------
@dataclass
class ParsedUpload:
    fields: dict[str, str]
    upload: StreamingWrite | None
    relative_path: str | None


async def stream_submission_form(request: Request, storage: Storage, max_bytes: int) -> ParsedUpload:
    """Parse a ``multipart/form-data`` body as it arrives; the ``image`` part is streamed into storage.

    Text fields: algorithm, testset, image_ref, team (each at most 64 KiB). The caller owns the
    returned upload (commit or abort).
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not 1 <= len(params.get(b"boundary", b"")) <= 70:
        # RFC 2046: a boundary is 1 to 70 characters (the parser refuses longer ones with an error)
        raise ApiError(
            "send the submission as multipart/form-data with fields algorithm, testset and a file part "
            "'image' (or a text field 'image_ref')",
            415,
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise ApiError(f"the upload ({int(declared)} bytes) exceeds the size limit of {max_bytes} bytes", 413)

    fields: dict[str, str] = {}
    state: dict = {"headers": {}, "field": b"", "value": b"", "name": None, "is_file": False, "buffer": None}
    relative_path = f"uploads/{utcnow():%Y/%m/%d}/{uuid.uuid4().hex}.tar"
    upload: StreamingWrite | None = None
    done = {"end": False}
    errors: list[ApiError] = []

    def on_part_begin() -> None:
        state.update(headers={}, field=b"", value=b"", name=None, is_file=False, buffer=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal upload
        _, disposition = parse_options_header(state["headers"].get("content-disposition"))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == "image":
            if upload is not None:
                raise ApiError("send one 'image' file part only", 422)
            state["is_file"] = True
            upload = storage.writer(relative_path, max_bytes)
        elif name not in TEXT_FIELDS:
            raise ApiError(f"unknown form field {name!r}; expected image, image_ref, algorithm, testset, team", 422)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["is_file"]:
            upload.write(data[start:end])  # type: ignore[union-attr]
        else:
            state["buffer"] += data[start:end]
            if len(state["buffer"]) > TEXT_FIELD_LIMIT:
                raise ApiError(f"form field {state['name']!r} is longer than {TEXT_FIELD_LIMIT} bytes", 422)

    def on_part_end() -> None:
        if not state["is_file"] and state["name"]:
            try:
                fields[state["name"]] = bytes(state["buffer"]).decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                errors.append(ApiError(f"form field {state['name']!r} is not UTF-8 text", 422))
                raise exc
            if "\x00" in fields[state["name"]]:  # PostgreSQL text cannot hold NUL (a 500 there)
                raise ApiError(f"form field {state['name']!r} contains a NUL character; send plain text", 422)

    def on_end() -> None:
        done["end"] = True

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadTooLarge as exc:
        _abort(upload)
        raise ApiError(f"the upload exceeds the size limit of {exc.limit} bytes; make the image smaller", 413) from exc
    except ApiError:
        _abort(upload)
        raise
    except ClientDisconnect as exc:
        _abort(upload)
        raise ApiError("the client went away before the upload finished; upload it again", 400) from exc
    except Exception as exc:  # noqa: BLE001 - the multipart parser's errors
        _abort(upload)
        if errors:
            raise errors[0] from exc
        raise ApiError(f"the multipart body is malformed ({exc}); upload it again", 422) from exc
    if not done["end"]:
        _abort(upload)
        raise ApiError("the multipart body ended early (truncated upload); upload it again", 422)
    return ParsedUpload(fields=fields, upload=upload, relative_path=relative_path if upload else None)


def _abort(upload: StreamingWrite | None) -> None:
    if upload is not None:
        upload.abort()


# -----------------------------------------------------------------------------------------------
# lookups, quota, duplicates
# -----------------------------------------------------------------------------------------------
def find_testset(db: Session, name: str | None) -> TestSet:
    if not name:
        raise ApiError("give the test set: form field 'testset' (its name)", 422)
    testset = db.scalar(sa.select(TestSet).where(TestSet.name == name))
    if testset is None:
        raise ApiError(f"no test set named {name!r}; list them with GET /api/v1/testsets", 404)
    return testset


def find_algorithm(db: Session, user: User, name: str | None, team_name: str | None) -> Algorithm:
    """The caller's team's algorithm ``name`` (organizers: any team's; 'team' disambiguates)."""
    if not name:
        raise ApiError("give the algorithm: form field 'algorithm' (its name)", 422)
    query = sa.select(Algorithm).join(Team).where(Algorithm.name == name)
    if user.role.value != "organizer":
        query = query.where(Algorithm.team_id == user.team_id)
    elif team_name:
        query = query.where(Team.name == team_name)
    found = db.scalars(query).all()
    if not found:
        raise ApiError(f"your team has no algorithm named {name!r}; create it with POST /api/v1/algorithms", 404)
    if len(found) > 1:
        raise ApiError(f"several teams have an algorithm named {name!r}; give the field 'team'", 422)
    return found[0]


def quota_window_start(testset: TestSet, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(days=testset.quota_period_days)


def counting_submissions(db: Session, team_id: int, testset: TestSet, now: dt.datetime) -> int:
    return db.scalar(
        sa.select(sa.func.count(Submission.id)).where(
            Submission.team_id == team_id,
            Submission.testset_id == testset.id,
            Submission.counts_against_quota.is_(True),
            Submission.received_at >= quota_window_start(testset, now),
        )
    ) or 0


def check_quota(db: Session, team_id: int, testset: TestSet, now: dt.datetime) -> None:
    used = counting_submissions(db, team_id, testset, now)
    if used >= testset.quota_submissions:
        oldest = db.scalar(
            sa.select(sa.func.min(Submission.received_at)).where(
                Submission.team_id == team_id,
                Submission.testset_id == testset.id,
                Submission.counts_against_quota.is_(True),
                Submission.received_at >= quota_window_start(testset, now),
            )
        )
        when = (
            f"; the next slot frees at {(oldest + dt.timedelta(days=testset.quota_period_days)).isoformat()}"
            if oldest
            else ""
        )
        raise ApiError(
            f"quota reached: your team has used {used} of {testset.quota_submissions} submissions per "
            f"{testset.quota_period_days} days on {testset.name!r}{when} (failed validations do not count)",
            429,
        )


def lock_team(db: Session, team_id: int) -> None:
    """Serialise intakes of one team (see the module docstring)."""
    db.execute(sa.update(Team).where(Team.id == team_id).values(intake_counter=Team.intake_counter + 1))


def check_duplicate(db: Session, algorithm: Algorithm, testset: TestSet, sha256: str | None, ref: str | None) -> None:
    query = sa.select(Submission.id).where(
        Submission.algorithm_id == algorithm.id,
        Submission.testset_id == testset.id,
        Submission.state.not_in([SubmissionState.failed, SubmissionState.cancelled]),
    )
    query = query.where(Submission.image_sha256 == sha256) if sha256 else query.where(Submission.image_ref == ref)
    existing = db.scalar(query.limit(1))
    if existing is not None:
        raise ApiError(
            f"this image was already submitted for {algorithm.name!r} on {testset.name!r} (submission {existing}); "
            "submit a changed image, or ask an organizer to re-run the existing submission",
            409,
        )


def check_image_ref(db: Session, team_id: int, image_ref: str, allowed_registries) -> None:
    """An ``image_ref`` runs only an image the team supplied (services/db/images.py); the refusal
    reads the same for another team's image and for one that does not exist."""
    if not images.image_ref_allowed(db, team_id, image_ref, allowed_registries):
        raise ApiError(images.refusal(allowed_registries), 422)


def _failed_validation(team_id: int, testset: TestSet):
    """Submissions of the team on the test set that failed before they were queued (validation)."""
    return (
        Submission.team_id == team_id,
        Submission.testset_id == testset.id,
        Submission.state == SubmissionState.failed,
        Submission.queued_at.is_(None),
        Submission.is_baseline.is_(False),
    )


def check_failed_resubmission(db: Session, team_id: int, testset: TestSet, sha256: str | None, ref: str | None) -> None:
    """The identical tarball (same sha256) or reference that already failed validation for this
    team is refused: running it again would fail again and cost storage without costing quota."""
    same = Submission.image_sha256 == sha256 if sha256 else Submission.image_ref == ref
    earlier = db.scalars(
        sa.select(Submission).where(*_failed_validation(team_id, testset), same).order_by(Submission.id.desc()).limit(1)
    ).first()
    if earlier is not None:
        raise ApiError(
            f"this exact image already failed validation on {testset.name!r} (submission {earlier.id}: "
            f"{earlier.failure_reason or 'see its validation log'}); fix the image and submit the changed one, "
            "or ask an organizer to re-run submission "
            f"{earlier.id} if the failure was not the image's fault",
            409,
        )


def check_failed_validation_rate(db: Session, team_id: int, testset: TestSet, now: dt.datetime, per_day: int) -> None:
    """At most ``per_day`` failed validations per team and test set in any 24 hours (they do not
    count against the quota, so without this a team could fill storage without limit)."""
    since = now - dt.timedelta(days=1)
    failed = db.scalar(
        sa.select(sa.func.count(Submission.id)).where(*_failed_validation(team_id, testset), Submission.failed_at >= since)
    ) or 0
    if failed >= per_day:
        first = db.scalar(
            sa.select(sa.func.min(Submission.failed_at)).where(*_failed_validation(team_id, testset), Submission.failed_at >= since)
        )
        when = f"; try again after {(first + dt.timedelta(days=1)).isoformat()}" if first else ""
        raise ApiError(
            f"your team had {failed} failed validations on {testset.name!r} in the last 24 hours (at most "
            f"{per_day}){when}; test the image locally first (see docs/container-contract.md)",
            429,
        )


def check_team_storage(db: Session, team_id: int, new_bytes: int, cap: int) -> None:
    from services.db.accounts import team_storage_bytes

    used = team_storage_bytes(db, team_id).get(team_id, 0)
    if used + new_bytes > cap:
        raise ApiError(
            f"your team's submissions hold {used / 2**30:.2f} GiB in storage; this image "
            f"({new_bytes / 2**30:.2f} GiB) would pass the team's cap of {cap / 2**30:.2f} GiB; "
            "wait until failed submissions' images are deleted, or ask an organizer",
            413,
        )


def record_submission(
    db: Session,
    user: User,
    algorithm: Algorithm,
    testset: TestSet,
    *,
    image_path: str | None,
    image_sha256: str | None,
    image_size: int | None,
    image_ref: str | None,
    settings=None,
) -> Submission:
    """Ownership, quota, duplicate, failed-resubmission, failure-rate and storage checks and the
    insert, in one serialised transaction (committed here)."""
    if settings is None:
        from services.config import get_settings

        settings = get_settings()
    now = utcnow()
    try:
        lock_team(db, algorithm.team_id)
        if image_ref is not None:
            check_image_ref(db, algorithm.team_id, image_ref, settings.allowed_registries)
        check_failed_resubmission(db, algorithm.team_id, testset, image_sha256, image_ref)
        check_failed_validation_rate(db, algorithm.team_id, testset, now, settings.failed_validations_per_day)
        check_quota(db, algorithm.team_id, testset, now)
        check_duplicate(db, algorithm, testset, image_sha256, image_ref)
        check_team_storage(db, algorithm.team_id, image_size or 0, settings.max_team_storage_bytes)
        submission = Submission(
            algorithm_id=algorithm.id,
            testset_id=testset.id,
            team_id=algorithm.team_id,
            submitted_by_id=user.id,
            state=SubmissionState.received,
            received_at=now,
            image_path=image_path,
            image_sha256=image_sha256,
            image_size_bytes=image_size,
            image_ref=image_ref,
            storage_bytes=image_size or 0,
        )
        db.add(submission)
        db.flush()
        db.add(
            AuditLog(
                actor_id=user.id,
                action="submission.receive",
                target=f"submission:{submission.id}",
                details={"algorithm": algorithm.name, "testset": testset.name, "sha256": image_sha256, "ref": image_ref},
            )
        )
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return submission
