"""Checking what a container wrote to /output, and scoring it. Every byte of it is untrusted.

:func:`check_outputs` walks the output folder without following any link, and without opening a
single file, and answers, per case of the shard, ``ok`` / ``missing`` / ``invalid`` with a reason
a person can act on. It is the safety check; the rules:

- only the case folders of the shard may exist at the top; anything else is listed in
  ``OutputReport.unexpected`` and never read;
- inside a case folder only ``combined_labels.nii.gz``, or ``segmentations/<organ>.nii.gz`` for
  the organs of :mod:`evaluation.labels` (when both are written the label map wins, as in the
  scorer's :func:`evaluation.io.detect_layout`); no other name, no deeper folder;
- every entry must be a plain file or folder: no symbolic link, no hard link (link count > 1), no
  device, FIFO or socket;
- per-file and per-run size caps (compressed bytes on disk).

A case that breaks a rule is ``invalid`` as a whole and scored worst with status
``invalid_prediction``, its files unread. The contents of an ``ok`` case are read once, when it is
scored, by :func:`score_outputs` -- which calls :func:`evaluation.scoring.score_case`, the function
``touchstone evaluate`` calls, so the service and the CLI give one folder the same rows. That read
applies the evaluation engine's guards (:func:`evaluation.io.read_nifti` under
:meth:`OutputLimits.read_limits`): the decompression-bomb guard (the header's declared size is
checked before any data is decompressed, and never more than that is decompressed), NIfTI-1/2
parsing, the grid equal to the ground truth's, values (a label map holds integers 0..9, a
per-organ mask 0 and 1 only, no NaN). A refused file gives its organ (per-organ layout) or its case
(label map) the protocol's worst score and a status (``unreadable``, ``too_large``,
``geometry_mismatch``, ``invalid_labels``); a missing organ file is an empty mask; nothing raises.

The check is read-only and runs after the container has been removed. :func:`prune_outputs`
then deletes everything outside the contract (at any depth) before scoring, and
:func:`delete_tree` removes the outputs of a failed run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from evaluation.protocols import Protocol
    from evaluation.scoring import ScoreRow

from evaluation.io import GeometryTolerance, GroundTruthError, ReadLimits
from evaluation.labels import COMBINED_LABELS_FILE, ORGANS, SEGMENTATIONS_DIR
from worker.runtime.base import FailureReason
from worker.monitoring import entry_kind, measure_tree

CaseStatus = Literal["ok", "missing", "invalid"]
Layout = Literal["combined", "per_organ"]



@dataclass(frozen=True)
class OutputLimits:
    max_file_bytes: int = 256 * 2**20  # compressed, per file
    max_total_bytes: int = 2 * 2**30  # compressed, the whole output folder
    max_entries: int = 10_000  # entries at the top of the output folder
    max_voxels: int = ReadLimits.max_voxels  # declared by a header (the bomb guard, at scoring)
    max_decompressed_bytes: int = ReadLimits.max_decompressed_bytes
    tolerance: GeometryTolerance = GeometryTolerance()

    def read_limits(self) -> ReadLimits:
        """The read limits the scorer applies to these outputs (the bomb guard among them)."""
        return ReadLimits(max_file_bytes=self.max_file_bytes, max_voxels=self.max_voxels,
                          max_decompressed_bytes=self.max_decompressed_bytes, allow_symlinks=False)


@dataclass(frozen=True)
class CaseOutput:
    case_id: str
    status: CaseStatus
    reason: str  # "" when ok
    layout: Layout | None = None
    files: tuple[str, ...] = ()  # paths relative to the output folder, for the scorer to read
    organs: tuple[str, ...] = ()  # organs present in the per-organ layout (all 9 for combined)


@dataclass(frozen=True)
class OutputReport:
    cases: dict[str, CaseOutput]
    unexpected: tuple[str, ...] = ()
    total_bytes: int = 0
    problems: tuple[str, ...] = field(default=())  # run-level: too many entries, too large

    @property
    def ok_cases(self) -> list[str]:
        return [c for c, out in self.cases.items() if out.status == "ok"]

    def failure(self) -> FailureReason | None:
        """The run-level failure: None when at least one case is usable, else why not."""
        if self.problems:
            return FailureReason.invalid_output("; ".join(self.problems))
        if self.ok_cases:
            return None
        if all(out.status == "missing" for out in self.cases.values()) and not self.unexpected:
            return FailureReason.no_output()
        bad = [out for out in self.cases.values() if out.status == "invalid"]
        if bad:
            first = bad[0]
            more = f" (and {len(bad) - 1} more case(s))" if len(bad) > 1 else ""
            return FailureReason.invalid_output(f"case {first.case_id}: {first.reason}{more}")
        return FailureReason.invalid_output(
            "nothing was written in the case folders; found only " + ", ".join(self.unexpected[:5])
        )


class _Invalid(Exception):
    pass


def _kind(mode: int) -> str:
    """How to name an entry in a reason: links, devices, FIFOs and sockets as the run watcher
    names them (worker.monitoring.entry_kind), else a folder or a file."""
    return entry_kind(mode) or ("a folder" if stat.S_ISDIR(mode) else "a file")


def _plain_file(path: Path, rel: str, limits: OutputLimits) -> os.stat_result:
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise _Invalid(f"{rel} is {_kind(st.st_mode)}, not a plain file")
    if st.st_nlink > 1:
        raise _Invalid(f"{rel} is a hard link ({st.st_nlink} names for one file); write a plain file")
    if st.st_size > limits.max_file_bytes:
        raise _Invalid(f"{rel} is {st.st_size} bytes, more than the {limits.max_file_bytes}-byte limit per file")
    return st


def _listing(directory: Path, limits: OutputLimits) -> list[os.DirEntry]:
    """The entries of a folder, sorted by name; more than ``max_entries`` is refused unread."""
    with os.scandir(directory) as iterator:
        entries = list(itertools.islice(iterator, limits.max_entries + 1))
    if len(entries) > limits.max_entries:
        raise _Invalid(f"{directory.name} holds more than {limits.max_entries} entries")
    return sorted(entries, key=lambda e: e.name)


def _check_case(case_dir: Path, case_id: str, limits: OutputLimits) -> tuple[CaseOutput, int]:
    rel_case = case_id
    entries = _listing(case_dir, limits)
    if not entries:
        return CaseOutput(case_id, "missing", f"the folder /output/{case_id} is empty"), 0
    total = 0
    combined: Path | None = None
    organ_files: dict[str, Path] = {}
    for entry in entries:
        rel = f"{rel_case}/{entry.name}"
        st = entry.stat(follow_symlinks=False)
        if entry.name == COMBINED_LABELS_FILE:
            total += _plain_file(Path(entry.path), rel, limits).st_size
            combined = Path(entry.path)
        elif entry.name == SEGMENTATIONS_DIR:
            if not stat.S_ISDIR(st.st_mode):
                raise _Invalid(f"{rel} is {_kind(st.st_mode)}, not a folder")
            for organ_entry in _listing(Path(entry.path), limits):
                organ_rel = f"{rel}/{organ_entry.name}"
                organ = organ_entry.name.removesuffix(".nii.gz")
                if organ == organ_entry.name or organ not in ORGANS:
                    raise _Invalid(f"unexpected file {organ_rel}; per-organ masks are named <organ>.nii.gz "
                                   f"for organ in {', '.join(ORGANS)}")
                total += _plain_file(Path(organ_entry.path), organ_rel, limits).st_size
                organ_files[organ] = Path(organ_entry.path)
        else:
            raise _Invalid(f"unexpected {_kind(st.st_mode)} {rel}; only {COMBINED_LABELS_FILE} or "
                           f"{SEGMENTATIONS_DIR}/<organ>.nii.gz belong in a case folder")
    if combined is not None:
        organ_files = {}  # as the scorer (evaluation.io.detect_layout): the label map wins
    if combined is None and not organ_files:
        return CaseOutput(case_id, "missing", f"/output/{case_id}/{SEGMENTATIONS_DIR} is empty"), total
    files = [combined] if combined is not None else [organ_files[o] for o in ORGANS if o in organ_files]
    rels = tuple(str(p.relative_to(case_dir.parent)) for p in files)
    if combined is not None:
        return CaseOutput(case_id, "ok", "", "combined", rels, ORGANS), total
    return CaseOutput(case_id, "ok", "", "per_organ", rels, tuple(o for o in ORGANS if o in organ_files)), total


def check_outputs(output_dir: Path, cts: Mapping[str, Path] | Iterable[str],
                  limits: OutputLimits | None = None) -> OutputReport:
    """Check the output folder of one run against the shard's cases (their ids, or a mapping
    ``case_id -> input CT path`` whose keys are used): names, kinds and sizes; no file is opened."""
    limits = limits or OutputLimits()
    output_dir = Path(output_dir)
    cts = list(cts)  # the case ids
    unexpected: list[str] = []
    problems: list[str] = []
    case_dirs: dict[str, Path] = {}
    try:
        top = list(os.scandir(output_dir))
    except OSError as exc:
        reason = f"no output folder ({exc.strerror or type(exc).__name__})"  # never the server's path
        return OutputReport({c: CaseOutput(c, "missing", reason) for c in cts}, problems=())
    if len(top) > limits.max_entries:
        problems.append(f"{len(top)} entries at the top of /output, more than {limits.max_entries}")
        top = top[: limits.max_entries]
    for entry in sorted(top, key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        if entry.name in cts and stat.S_ISDIR(st.st_mode):
            case_dirs[entry.name] = Path(entry.path)
        else:
            unexpected.append(f"{entry.name} ({_kind(st.st_mode)})")
    cases: dict[str, CaseOutput] = {}
    total = 0
    for case_id in cts:
        if case_id not in case_dirs:
            cases[case_id] = CaseOutput(case_id, "missing", f"no folder /output/{case_id}")
            continue
        try:
            result, size = _check_case(case_dirs[case_id], case_id, limits)
        except _Invalid as exc:
            result, size = CaseOutput(case_id, "invalid", str(exc)), 0
        except OSError as exc:
            result, size = CaseOutput(case_id, "invalid", f"cannot be read ({exc.strerror})"), 0
        cases[case_id] = result
        total += size
    if total > limits.max_total_bytes:
        problems.append(f"{total} bytes in total, more than the {limits.max_total_bytes}-byte limit per run")
    return OutputReport(cases, tuple(unexpected), total, tuple(problems))



def delete_tree(path: Path) -> int:
    """Delete a run folder (or anything in it) without following a link; returns the bytes its
    files held. No error when it is already gone."""
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    size = measure_tree(path).bytes
    shutil.rmtree(path, ignore_errors=True)  # fd-based: never follows a link out of the tree
    return size


def prune_outputs(output_dir: Path, report: OutputReport) -> tuple[int, int]:
    """Delete everything in ``output_dir`` outside the container contract before scoring.

    Kept: the files :func:`check_outputs` accepted for an ``ok`` case
    (``<case_id>/combined_labels.nii.gz``, or ``<case_id>/segmentations/<organ>.nii.gz``) and the
    folders holding them; everything else -- at any depth, links and special files included, the
    files of invalid cases too -- is removed. Returns (bytes kept, bytes removed).
    """
    output_dir = Path(output_dir)
    keep = {rel for out in report.cases.values() if out.status == "ok" for rel in out.files}
    keep_dirs = {str(Path(rel).parent) for rel in keep} | {str(Path(rel).parent.parent) for rel in keep
                                                          if Path(rel).parent.name == SEGMENTATIONS_DIR}
    kept = removed = 0

    def walk(directory: Path, relative: str) -> None:
        nonlocal kept, removed
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            rel = f"{relative}/{entry.name}" if relative else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if rel in keep_dirs:
                    walk(Path(entry.path), rel)
                else:
                    removed += delete_tree(Path(entry.path))
            elif rel in keep and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                kept += st.st_size
            else:
                try:
                    os.unlink(entry.path)
                    removed += st.st_size if stat.S_ISREG(st.st_mode) else 0
                except OSError:
                    pass

    walk(output_dir, "")
    return kept, removed


# --------------------------------------------------------------------------------------------------
# scoring: the one path (evaluation.scoring, as `touchstone evaluate`)
# --------------------------------------------------------------------------------------------------
log = logging.getLogger("touchstone.worker")

#: how the output folder is named in the rows' details (the container's path, never the worker's)
CONTAINER_OUTPUT = "/output"


def _as_container_paths(rows: list[ScoreRow], output_dir: Path) -> list[ScoreRow]:
    forms = sorted({str(output_dir), str(output_dir.absolute()), str(output_dir.resolve())}, key=len, reverse=True)

    def shown(detail: str) -> str:
        for form in forms:
            detail = detail.replace(form, CONTAINER_OUTPUT)
        return detail

    return [dataclasses.replace(r, detail=shown(r.detail)) if r.detail else r for r in rows]


def score_output(case_id: str, labels: Path, output_dir: Path, protocol: Protocol | str,
                 limits: OutputLimits | None = None, *, device: str = "cpu") -> list[ScoreRow]:
    """Score one case of a checked output folder (``output_dir/<case_id>``) against its ground
    truth with :func:`evaluation.scoring.score_case` -- the function ``touchstone evaluate`` calls --
    under :meth:`OutputLimits.read_limits`. Each file is read once, here; a bad file gives its
    organ (or, for a label map, its case) the worst score and a status; paths in the details are
    the container's (``/output/...``). Raises :class:`evaluation.io.GroundTruthError` only."""
    from evaluation.scoring import score_case

    limits = limits or OutputLimits()
    output_dir = Path(output_dir)
    rows = score_case(case_id, labels, output_dir / case_id, protocol, limits.read_limits(),
                      tolerance=limits.tolerance, device=device)
    return _as_container_paths(rows, output_dir)


def score_outputs(cases: Sequence[tuple[str, Path]], output_dir: Path, protocol: Protocol | str,
                  limits: OutputLimits | None = None) -> dict[str, list[ScoreRow]]:
    """:func:`score_output` for each ``(case_id, labels path)``; a case whose ground truth is
    unusable is left out and logged (the organizer's data, not the submission's fault)."""
    rows: dict[str, list[ScoreRow]] = {}
    for case_id, labels in cases:
        try:
            rows[case_id] = score_output(case_id, labels, output_dir, protocol, limits)
        except GroundTruthError as exc:
            log.error("case %s: ground truth cannot be used: %s", case_id, exc)
    return rows
