"""Submission intake: stream the upload to storage, check it is a ``docker save`` tarball and look up
the algorithm and test set; :func:`services.submissions.record` then enforces the quota and the
duplicate rule and stores the submission as ``received`` (the router hands it to the queue).

Streaming: the multipart body is parsed as it arrives (python-multipart's push parser); the file
part goes straight into :class:`services.storage.StreamingWrite` (sha256 and size limit on the fly),
so memory use does not depend on the upload's size and the bytes are written to disk once.

Quota race: see services/submissions.py (the check-and-insert is serialised per team).
"""

from __future__ import annotations

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
from services.db.models import Algorithm, Team, TestSet, User
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
# lookups (the quota and duplicate checks: services/submissions.py)
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
