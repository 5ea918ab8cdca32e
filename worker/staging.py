"""Staging a shard's inputs for one container run, without copying a CT and never a label.

The container sees (docs/container-contract.md)::

    /input/cases.json                 {"version": 1, "cases": [{"case_id": "...", "ct": "/input/<id>/ct.nii.gz"}, ...]}
    /input/<case_id>/ct.nii.gz        one folder per case of the shard

:func:`stage_shard` builds that tree in a fresh host folder. Each CT is **hard-linked** from
storage when storage is on the same filesystem (no copy, no extra space). Where it is not (or the
link is refused), an empty placeholder file is written instead and the CT is **bind-mounted
read-only** onto it (:attr:`StagedShard.mounts`, passed as ``RunSpec.extra_input_mounts``).

Hard links share the inode, hence the permissions, of the stored CT: the container runs as uid
65534 and must be able to read it, so staging adds read permission for "others" to a stored CT
that lacks it (a CT is what every algorithm is given; labels are never touched). The API accepts
only CT paths: there is no way to stage anything else.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evaluation.labels import CT_FILE
from worker.runtime.base import Mount
from worker.sandbox import INPUT_MOUNT

CASES_FILE = "cases.json"
#: a case id must be usable as a folder name on every system, and never a path
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

StagingMode = Literal["auto", "link", "bind"]


class StagingError(ValueError):
    """A shard that cannot be staged (bad case id, missing CT, non-empty staging folder)."""


@dataclass(frozen=True)
class StagedShard:
    input_dir: Path  # mount at /input (read-only)
    case_ids: tuple[str, ...]
    mounts: tuple[Mount, ...]  # per-case read-only bind mounts, for CTs that could not be linked
    linked: int  # how many CTs were hard-linked


def validate_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not CASE_ID_PATTERN.match(case_id) or case_id in (".", ".."):
        raise StagingError(
            f"case id {case_id!r} cannot be a folder name; use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return case_id


def _make_readable(path: Path) -> None:
    mode = path.stat().st_mode
    if not mode & stat.S_IROTH:
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def stage_shard(cases: Iterable[tuple[str, Path]], staging_dir: Path, mode: StagingMode = "auto") -> StagedShard:
    """Stage ``cases`` — ``(case_id, path of its stored CT)`` pairs, in processing order — into
    the fresh folder ``staging_dir``.

    ``mode``: ``"auto"`` hard-links and falls back to a bind mount per case when linking fails
    (other filesystem, ``EXDEV``; or a refused link, ``EPERM``); ``"link"`` insists on links;
    ``"bind"`` always bind-mounts (useful when the worker's storage is a network mount).
    """
    cases = [(validate_case_id(case_id), Path(ct)) for case_id, ct in cases]
    if not cases:
        raise StagingError("a shard needs at least one case")
    seen: set[str] = set()
    for case_id, ct in cases:
        if case_id in seen:
            raise StagingError(f"case id {case_id!r} appears twice in the shard")
        seen.add(case_id)
        if not ct.is_file():
            raise StagingError(f"the CT of case {case_id!r} is missing at {ct}")
    staging_dir = Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    if any(staging_dir.iterdir()):
        raise StagingError(f"staging folder {staging_dir} is not empty; every run needs a fresh one")
    os.chmod(staging_dir, 0o755)

    mounts: list[Mount] = []
    linked = 0
    for case_id, ct in cases:
        case_dir = staging_dir / case_id
        case_dir.mkdir()
        os.chmod(case_dir, 0o755)
        target = case_dir / CT_FILE
        source = ct.resolve()
        _make_readable(source)
        if mode in ("auto", "link"):
            try:
                os.link(source, target)
                linked += 1
                continue
            except OSError as exc:
                if mode == "link" or exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise StagingError(f"could not hard-link the CT of case {case_id!r} ({exc})") from exc
        # placeholder: the bind mount needs an existing file to mount onto, and /input is read-only
        target.touch(mode=0o444)
        mounts.append(Mount(host_path=source, container_path=f"{INPUT_MOUNT}/{case_id}/{CT_FILE}"))

    listing = {
        "version": 1,
        "cases": [{"case_id": case_id, "ct": f"{INPUT_MOUNT}/{case_id}/{CT_FILE}"} for case_id, _ in cases],
    }
    cases_file = staging_dir / CASES_FILE
    cases_file.write_text(json.dumps(listing, indent=1) + "\n")
    os.chmod(cases_file, 0o444)
    return StagedShard(
        input_dir=staging_dir,
        case_ids=tuple(case_id for case_id, _ in cases),
        mounts=tuple(mounts),
        linked=linked,
    )
