"""The case viewer: one case of one submission as three orthogonal CT slices with the ground truth and
the prediction drawn as contours per organ (rendering: :mod:`services.web.slices`), the case's
per-organ scores, and a "worst cases" list per organ that links to it.

    /viewer/sign-in                              a form that keeps an API token in an HttpOnly,
                                                 SameSite=Strict cookie (browsers send no Bearer
                                                 header with <img>); POST /viewer/sign-out drops it
    /viewer/submissions/{id}?organ=&metric=      the worst cases of the submission the caller may see
    /viewer/submissions/{id}/cases/{case}?organ=&axial=&coronal=&sagittal=
                                                 the viewer page (slice chooser per plane; default
                                                 slice through the centre of ``organ``, else of the volume)
    /viewer/submissions/{id}/cases/{case}/{plane}/{index}.png
                                                 one rendered slice (cached per case, submission,
                                                 plane and index)

Who sees what (:func:`services.api.visibility.can_see_case_images`): organizers every case; an
inventor their own team's submissions on public-sample cases only; nobody else any image. A case
one may not see is answered 404 like a case that does not exist, so hidden case ids are never
confirmed. The caller is the Bearer token (``Authorization`` header) or the sign-in cookie; a bad
Bearer token is a 401 as everywhere in the API.

Files. The CT and the ground truth are the organizer's (read with :class:`ReadLimits.trusted`);
the prediction is untrusted and read exactly as the scorer reads it (``evaluation.io.read_labels``
with the default :class:`ReadLimits`: size cap, decompression-bomb guard, strict label values, the
ground truth's grid). Where the prediction lives comes from the stored run information: the
case's ``CaseRun.detail`` (the prediction folder relative to storage, for every case run in a
shard), else, for a public-sample case, the newest attempt of the submission's validation run
(``runs/submission-<id>/validation/<time>-<random>/output/<case>``, docs/execution.md). A
prediction that is missing, deleted or unreadable shows the CT and the truth with a note saying
why -- never a 500, never a server path.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Form, Path as PathParam, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from evaluation.io import STATUSES, CaseError, ReadLimits, check_geometry, read_labels, read_nifti
from evaluation.labels import LABEL_IDS, ORGANS
from evaluation.stats import higher_is_better
from services.api.deps import optional_user
from services.api.errors import ApiError
from services.api.visibility import can_see_case_images
from services.db.accounts import lookup_token
from services.db.enums import Role, SubmissionState
from services.db.models import Case, CaseRun, Score, Submission, TestSet, User
from services.db.session import request_session
from services.leaderboard.compute import AVERAGE_ORGAN, BOARD_METRICS
from services.storage import Storage, StorageError
from services.web import slices

log = logging.getLogger("touchstone.viewer")
router = APIRouter(include_in_schema=False)

#: the sign-in cookie (the API token itself; HttpOnly, SameSite=Strict, Secure behind https)
TOKEN_COOKIE = "touchstone_token"
#: the worker's run folders (worker.runs.RUNS_DIR, worker.validation.VALIDATION_SHARD_LABEL -- services
#: never import the worker; a unit test keeps them equal; docs/execution.md)
RUNS_DIR = "runs"
VALIDATION_RUN = "validation"
#: decoded cases kept in memory (CT + truth + prediction: one page asks for three slices of one case)
VOLUME_CACHE_ENTRIES = 2
#: rendered PNGs kept in memory, bytes
PNG_CACHE_BYTES = 64 * 2**20
#: how many worst cases a list shows
WORST_CASES = 10


def get_db(request: Request) -> Iterator[Session]:
    yield from request_session(request)


def _templates():
    from services.web.pages import templates  # one Jinja2 environment (filters, base.html) for every page

    return templates


# --------------------------------------------------------------------------------------------
# who is asking
# --------------------------------------------------------------------------------------------
def viewer_user(request: Request, db: Session) -> User | None:
    """The caller: the Bearer token (a bad one is a 401), else the sign-in cookie (a stale one is
    anonymous), else None."""
    user = optional_user(request, db)
    if user is not None:
        return user
    plain = request.cookies.get(TOKEN_COOKIE)
    if not plain:
        return None
    token = lookup_token(db, plain)
    return token.user if token is not None and token.user.is_active else None


def page_user(request: Request, db: Session) -> User | None:
    """The caller for pages everybody may read (the submission page): never raises."""
    try:
        return viewer_user(request, db)
    except ApiError:
        return None


def _hidden(what: str) -> ApiError:
    return ApiError(f"no {what} visible to you; organizers see every case, inventors their own submissions' "
                    "public-sample cases (sign in at /viewer/sign-in)", 404)


def visible_case(db: Session, user: User | None, submission_id: int, case_id: str) -> tuple[Submission, Case]:
    """The submission and its test set's case ``case_id`` if ``user`` may see its images; 404 for
    anything else (also for a case that exists but is hidden from ``user``)."""
    submission = db.get(Submission, submission_id)
    case = None
    if submission is not None:
        case = db.scalar(sa.select(Case).where(Case.testset_id == submission.testset_id, Case.case_id == case_id))
    if submission is None or case is None or not can_see_case_images(user, submission, case.public_sample):
        raise _hidden(f"case {case_id!r} of submission {submission_id}")
    return submission, case


def sees_any_case(user: User | None, submission: Submission) -> bool:
    """Whether ``user`` may see the images of at least one (public-sample) case of ``submission``."""
    return can_see_case_images(user, submission, True)


# --------------------------------------------------------------------------------------------
# where the prediction is
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionPlace:
    """The prediction folder of one case, or None and a note a person can read (no server path)."""

    folder: Path | None
    note: str | None = None


def find_prediction(db: Session, storage: Storage, submission: Submission, case: Case) -> PredictionPlace:
    if submission.is_baseline:
        return PredictionPlace(None, "This submission's results were imported from published numbers: "
                                     "no predictions are stored for it.")
    if submission.predictions_deleted_at is not None:
        return PredictionPlace(None, "The predictions of this submission were deleted under the test set's "
                                     f"retention setting on {submission.predictions_deleted_at:%Y-%m-%d}.")
    run = db.scalar(sa.select(CaseRun).where(CaseRun.submission_id == submission.id, CaseRun.case_id == case.id))
    if run is not None and run.status == "ok" and run.detail:
        try:
            folder = storage.path(run.detail)
        except StorageError:
            return PredictionPlace(None, "The stored run information names no prediction folder in storage.")
        if os.path.lexists(folder):
            return PredictionPlace(folder)
        return PredictionPlace(None, _gone(submission))
    if run is not None:
        reason = f": {run.detail}" if run.detail else ""
        return PredictionPlace(None, f"No prediction: the run of this case ended '{run.status}'{reason}.")
    if case.public_sample:
        folder = _validation_prediction(storage, submission.id, case.case_id)
        if folder is not None:
            return PredictionPlace(folder)
    if submission.state in (SubmissionState.received, SubmissionState.validating, SubmissionState.queued,
                            SubmissionState.running):
        return PredictionPlace(None, f"No prediction yet: the submission is {submission.state.value}.")
    return PredictionPlace(None, _gone(submission))


def _gone(submission: Submission) -> str:
    if submission.state in (SubmissionState.failed, SubmissionState.cancelled):
        return (f"No prediction: the submission {submission.state.value}, and the outputs of failed and cancelled "
                "submissions are deleted once their reason is stored.")
    return "No prediction is stored for this case (the run wrote none, or its files were deleted)."


def _validation_prediction(storage: Storage, submission_id: int, case_id: str) -> Path | None:
    """``<case>`` in the newest validation attempt's output (attempt folders sort by their UTC time;
    failed attempts' outputs are deleted, so the newest is the one that passed)."""
    try:
        base = storage.path(f"{RUNS_DIR}/submission-{submission_id}/{VALIDATION_RUN}")
        if not base.is_dir():
            return None
        attempts = sorted((e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False)), reverse=True)
        for attempt in attempts:
            folder = storage.path(f"{RUNS_DIR}/submission-{submission_id}/{VALIDATION_RUN}/{attempt}/output/{case_id}")
            if os.path.lexists(folder):
                return folder
    except (StorageError, OSError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# decoding (cached) and rendering (cached)
# --------------------------------------------------------------------------------------------
class CaseProblem(Exception):
    """The organizer's files of a case cannot be shown (the message names the problem, no path)."""


@dataclass
class LoadedCase:
    #: what the decoded files were: case, submission, the prediction's place, the files' mtimes
    key: tuple
    volumes: slices.CaseVolumes
    #: why the prediction is not drawn (or drawn in part), None when it is drawn whole
    prediction_note: str | None


def _organs_of(testset: TestSet) -> dict[str, int]:
    from evaluation.protocols import Protocol

    try:
        return dict(Protocol.from_dict(testset.protocol_json).organs)
    except Exception:  # noqa: BLE001 - an old row without the full description: the Touchstone label set
        return dict(LABEL_IDS)


def _case_error(exc: CaseError) -> str:
    organ = f"{exc.organ}: " if exc.organ else ""
    return f"{organ}{exc.problem}. Fix: {exc.fix}"


def load_case(case: Case, organs: dict[str, int], prediction: PredictionPlace, key: tuple = ()) -> LoadedCase:
    """Decode the CT, the ground truth and the prediction of ``case`` (see the module docstring for
    the limits). Raises :class:`CaseProblem` when the organizer's files cannot be used."""
    if not case.image_path or not case.labels_path:
        raise CaseProblem("this case has no stored CT or labels (imported results)")
    try:
        ct = read_nifti(case.image_path, ReadLimits.trusted())
    except CaseError as exc:
        raise CaseProblem(f"the CT cannot be read: {exc.problem}") from None
    try:
        truth = read_labels(case.labels_path, organs, untrusted=False)
        check_geometry(truth.geometry, ct.geometry)
    except CaseError as exc:
        raise CaseProblem(f"the ground truth cannot be shown over the CT: {exc.problem}") from None
    note = prediction.note
    predicted = None
    if prediction.folder is not None:
        try:
            labels = read_labels(prediction.folder, organs, limits=ReadLimits(), untrusted=True,
                                 reference=truth.geometry, collect_organ_errors=True)
        except CaseError as exc:
            note = f"The prediction cannot be shown ({exc.status}): {_case_error(exc)}"
        except MemoryError:
            note = "The prediction cannot be shown: not enough memory to read it."
        else:
            predicted = slices.OrganMasks(labels, organs)
            if labels.organ_errors:
                note = "Not drawn (their files were refused): " + "; ".join(
                    _case_error(e) for e in labels.organ_errors.values())
    volumes = slices.CaseVolumes(ct=slices.ras_view(ct.data, ct.geometry.affine),
                                 spacing=slices.ras_spacing(ct.geometry),
                                 truth=slices.OrganMasks(truth, organs), prediction=predicted)
    return LoadedCase(key, volumes, note)


class _Caches:
    """The decoded cases (LRU, :data:`VOLUME_CACHE_ENTRIES`) and the rendered PNGs (LRU bounded
    by :data:`PNG_CACHE_BYTES`). A case is decoded once however many of its slices are asked for at
    the same time (a lock per case being decoded); other cases and cached PNGs do not wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cases: OrderedDict[tuple, LoadedCase | CaseProblem] = OrderedDict()
        self.loading: dict[tuple, threading.Lock] = {}
        self.pngs: OrderedDict[tuple, bytes] = OrderedDict()
        self.png_bytes = 0

    def _cached_case(self, key: tuple) -> LoadedCase | CaseProblem | None:
        with self.lock:
            if key in self.cases:
                self.cases.move_to_end(key)
                return self.cases[key]
            return None

    def case(self, key: tuple, load) -> LoadedCase:
        found = self._cached_case(key)
        if found is None:
            with self.lock:
                key_lock = self.loading.setdefault(key, threading.Lock())
            with key_lock:
                found = self._cached_case(key)  # decoded by the request we waited for
                if found is None:
                    try:
                        found = load()
                    except CaseProblem as exc:
                        found = exc
                    with self.lock:
                        self.cases[key] = found
                        while len(self.cases) > VOLUME_CACHE_ENTRIES:
                            self.cases.popitem(last=False)
                        self.loading.pop(key, None)
        if isinstance(found, CaseProblem):
            raise found
        return found

    def png(self, key: tuple, render) -> bytes:
        with self.lock:
            if key in self.pngs:
                self.pngs.move_to_end(key)
                return self.pngs[key]
        data = render()
        with self.lock:
            if key not in self.pngs:
                self.pngs[key] = data
                self.png_bytes += len(data)
                while self.png_bytes > PNG_CACHE_BYTES and self.pngs:
                    _, old = self.pngs.popitem(last=False)
                    self.png_bytes -= len(old)
        return data

    def clear(self) -> None:
        with self.lock:
            self.cases.clear()
            self.pngs.clear()
            self.png_bytes = 0


caches = _Caches()


def _stamp(path: str | Path | None) -> float | None:
    try:
        return os.stat(path).st_mtime_ns if path else None  # type: ignore[arg-type]
    except OSError:
        return None


def open_case(request: Request, db: Session, submission: Submission, case: Case) -> LoadedCase:
    """The decoded case (cached while its files and the prediction's place are unchanged)."""
    storage = Storage.from_settings(request.app.state.settings)
    place = find_prediction(db, storage, submission, case)
    key = (case.id, submission.id, str(place.folder), place.note, _stamp(case.image_path), _stamp(case.labels_path),
           _stamp(place.folder))
    organs = _organs_of(submission.testset)
    return caches.case(key, lambda: load_case(case, organs, place, key))


def check_index(volumes: slices.CaseVolumes, plane: str, index: int) -> None:
    n = volumes.n_slices(plane)
    if not 0 <= index < n:
        raise ApiError(f"{plane} slice {index} is out of range: this case has {n} {plane} slices, choose 0..{n - 1}", 422)


# --------------------------------------------------------------------------------------------
# scores and worst cases
# --------------------------------------------------------------------------------------------
def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:.3f}"


def case_scores(db: Session, submission: Submission, case: Case) -> list[dict]:
    """The case's score rows under the test set's current protocol version, in label order."""
    testset = submission.testset
    rows = db.scalars(sa.select(Score).where(Score.submission_id == submission.id, Score.case_id == case.id,
                                             Score.protocol_key == testset.protocol_key))
    order = {o: i for i, o in enumerate(_organs_of(testset))}
    out = [{"organ": r.organ, "dsc": _number(r.dsc), "nsd": _number(r.nsd), "hd95": _number(r.hd95),
            "assd": _number(r.assd), "status": r.status, "meaning": STATUSES.get(r.status, r.status)} for r in rows]
    return sorted(out, key=lambda r: (order.get(r["organ"], len(order)), r["organ"]))


def worst_cases(db: Session, user: User | None, submission: Submission, organ: str, metric: str,
                limit: int = WORST_CASES) -> list[dict] | None:
    """The ``limit`` cases of ``submission`` with the worst ``metric`` for ``organ`` (``average``:
    the mean over the organs scored for the case) among those ``user`` may see; None when ``user``
    may see none. Not-scored rows (NULL) are left out; failed predictions carry the protocol's worst
    value and so come first."""
    if not sees_any_case(user, submission):
        return None
    column = getattr(Score, metric, None) if metric in Score.__table__.columns else None
    if column is None:  # a metric kept outside the scores table (e.g. lesion-level): no per-case list here
        return []
    value = column if organ != AVERAGE_ORGAN else sa.func.avg(column)
    query = (sa.select(Case.case_id, Case.hospital, Case.public_sample, value.label("value"))
             .join(Case, Case.id == Score.case_id)
             .where(Score.submission_id == submission.id, Score.protocol_key == submission.testset.protocol_key,
                    column.is_not(None)))
    if user is None or user.role is not Role.organizer:
        query = query.where(Case.public_sample.is_(True))
    if organ != AVERAGE_ORGAN:
        query = query.where(Score.organ == organ)
    else:
        query = query.group_by(Case.case_id, Case.hospital, Case.public_sample)
    worst_first = sa.asc("value") if higher_is_better(metric) else sa.desc("value")
    rows = db.execute(query.order_by(worst_first, Case.case_id).limit(limit)).all()
    return [{"case_id": r.case_id, "hospital": r.hospital, "public_sample": r.public_sample,
             "value": _number(r.value), "url": case_url(submission.id, r.case_id, None if organ == AVERAGE_ORGAN else organ)}
            for r in rows]


def case_url(submission_id: int, case_id: str, organ: str | None = None) -> str:
    url = f"/viewer/submissions/{submission_id}/cases/{quote(case_id, safe='')}"
    return f"{url}?organ={organ}" if organ else url


def worst_cases_for_page(request: Request, db: Session, submission: Submission, organ: str, metric: str) -> list[dict] | None:
    """The submission page's worst-cases list: only for callers who may see some case (never raises)."""
    return worst_cases(db, page_user(request, db), submission, organ, metric)


# --------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------
def _page_error(request: Request, status: int, message: str) -> HTMLResponse:
    return _templates().TemplateResponse(request, "error.html", {"message": message}, status_code=status)


CaseIdPath = PathParam(..., min_length=1, max_length=200)


@router.get("/viewer/sign-in", response_class=HTMLResponse)
def sign_in_page(request: Request, next: str = Query("/leaderboards", max_length=500)) -> HTMLResponse:
    return _templates().TemplateResponse(request, "viewer.html", {"sign_in": True, "next": _safe_next(next)})


def _safe_next(target: str) -> str:
    """Only a path of this site (never ``//host`` or ``http://...``)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/leaderboards"


@router.post("/viewer/sign-in")
def sign_in(request: Request, token: str = Form(..., max_length=200), next: str = Form("/leaderboards", max_length=500),
            db: Session = Depends(get_db)) -> Response:
    found = lookup_token(db, token.strip())
    if found is None or not found.user.is_active:
        return _page_error(request, 401, "unknown or revoked token; ask an organizer for a new one")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(TOKEN_COOKIE, token.strip(), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/viewer/sign-out")
def sign_out() -> Response:
    response = RedirectResponse("/leaderboards", status_code=303)
    response.delete_cookie(TOKEN_COOKIE, path="/")
    return response


@router.get("/viewer/submissions/{submission_id}", response_class=HTMLResponse)
def worst_cases_page(request: Request, submission_id: int, organ: str = Query(AVERAGE_ORGAN),
                     metric: str = Query("dsc"), db: Session = Depends(get_db)) -> HTMLResponse:
    if organ != AVERAGE_ORGAN and organ not in ORGANS or metric not in BOARD_METRICS:
        return _page_error(request, 422, f"organ must be one of {[AVERAGE_ORGAN, *ORGANS]} and metric one of {list(BOARD_METRICS)}")
    user = viewer_user(request, db)
    submission = db.get(Submission, submission_id)
    if submission is None or not sees_any_case(user, submission):
        return _page_error(request, 404, _hidden(f"case of submission {submission_id}").detail)
    return _templates().TemplateResponse(request, "viewer.html", {
        "index": True, "submission": submission, "ts": submission.testset, "organ": organ, "metric": metric,
        "organs": [AVERAGE_ORGAN, *ORGANS], "metrics": BOARD_METRICS,
        "worst": worst_cases(db, user, submission, organ, metric), "organizer": user.role is Role.organizer})


@router.get("/viewer/submissions/{submission_id}/cases/{case_id}", response_class=HTMLResponse)
def case_page(request: Request, submission_id: int, case_id: str = CaseIdPath, organ: str | None = Query(None),
              axial: int | None = Query(None), coronal: int | None = Query(None), sagittal: int | None = Query(None),
              db: Session = Depends(get_db)) -> HTMLResponse:
    user = viewer_user(request, db)
    try:
        submission, case = visible_case(db, user, submission_id, case_id)
    except ApiError as exc:
        return _page_error(request, exc.status_code, exc.detail)
    organs = _organs_of(submission.testset)
    if organ is not None and organ not in organs:
        return _page_error(request, 422, f"organ must be one of {list(organs)}")
    context = {"viewer": True, "submission": submission, "ts": submission.testset, "case": case, "organ": organ,
               "organ_names": list(organs), "colours": {o: "#%02x%02x%02x" % slices.colour(o) for o in organs},
               "scores": case_scores(db, submission, case), "window": slices.ABDOMEN_WINDOW.label(),
               "base": case_url(submission.id, case.case_id), "problem": None, "planes": [], "note": None}
    try:
        loaded = open_case(request, db, submission, case)
    except CaseProblem as exc:
        context["problem"] = f"This case cannot be shown: {exc}. An organizer must fix the test set's files."
        return _templates().TemplateResponse(request, "viewer.html", context)
    chosen = {"axial": axial, "coronal": coronal, "sagittal": sagittal}
    for plane in slices.PLANES:
        n = loaded.volumes.n_slices(plane)
        index = chosen[plane] if chosen[plane] is not None else loaded.volumes.default_index(plane, organ)
        if not 0 <= index < n:
            return _page_error(request, 422, f"{plane} slice {index} is out of range: this case has {n} {plane} "
                                             f"slices, choose 0..{n - 1}")
        context["planes"].append({"name": plane, "n": n, "index": index})
    context["note"] = loaded.prediction_note
    return _templates().TemplateResponse(request, "viewer.html", context)


@router.get("/viewer/submissions/{submission_id}/cases/{case_id}/{plane}/{index}.png")
def slice_png(request: Request, submission_id: int, index: int, plane: str, case_id: str = CaseIdPath,
              db: Session = Depends(get_db)) -> Response:
    user = viewer_user(request, db)
    submission, case = visible_case(db, user, submission_id, case_id)
    if plane not in slices.PLANES:
        raise ApiError(f"plane must be one of {list(slices.PLANES)}", 422)
    try:
        loaded = open_case(request, db, submission, case)
    except CaseProblem as exc:
        raise ApiError(f"this case cannot be shown: {exc}", 409) from None
    check_index(loaded.volumes, plane, index)
    data = caches.png((*loaded.key, plane, index), lambda: loaded.volumes.render(plane, index))
    # private: the answer depends on who asks; the slice of a stored run does not change
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
