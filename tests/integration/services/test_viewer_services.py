"""The case viewer through the real API/pages app, on SQLite and PostgreSQL: a phantom test set
imported with its files, team Alpha's submission scored by the real scorer (evaluation.scoring,
what the worker calls) from prediction files laid out in storage as the worker leaves them (a
validation run for the public-sample case, a shard for the hidden ones, with their CaseRun rows),
team Beta's likewise; the viewer's role matrix; the rendered page, its slices and notes; the
worst-cases list on the submission page; and a real headless Chromium screenshot."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import served_app
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.orm import Session

from evaluation import io as nifti
from evaluation import phantoms
from evaluation.scoring import score_case, worst_rows
from services.db.accounts import create_user
from services.db.enums import SubmissionState
from services.db.models import Algorithm, Case, CaseRun, Score, Submission, Team
from services.db.session import create_db_engine
from services.db.states import transition
from services.db.testsets import import_testset
from services.leaderboard import on_submission_scored
from services.leaderboard.compute import StatsOptions
from services.storage import Storage
from services.web import slices, viewer

ROLES = ("anon", "alice", "bob", "ana", "org")


def _write_prediction(folder: Path, case_dir: Path, shift: tuple[int, int, int]) -> None:
    truth = nifti.read_labels(case_dir / "segmentations", untrusted=False)
    labels, affine = phantoms.make_prediction(truth.label_map, truth.geometry.affine, "shift", shift=shift)
    nifti.write_masks(folder, labels, affine)


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory) -> Path:
    return phantoms.write_phantom_set(tmp_path_factory.mktemp("viewer") / "ph", 4, public_sample=1)


@pytest.fixture
def vworld(settings, tmp_path, phantom_manifest):
    """4 tiny phantoms (1 public sample). Alpha: public case predicted in its validation run; hidden
    case 1 predicted well, hidden case 2 with a corrupt liver file, hidden case 3 never written
    (the run said missing_output). Beta: its public case predicted."""
    manifest = phantom_manifest
    root = manifest.parent
    storage = Storage(settings.storage_dir)
    engine = create_db_engine(str(settings.database_url), poolclass=sa.pool.NullPool)
    tokens = {}
    with Session(engine) as s:
        for name, role, team in (("org", "organizer", None), ("alice", "inventor", "Alpha"),
                                 ("bob", "inventor", "Beta"), ("ana", "analyst", None)):
            _, tokens[name] = create_user(s, name, role, team)
        ts = import_testset(s, "ph", manifest, settings=settings)
        ts.min_group_size = 1
        s.flush()
        cases = list(s.scalars(sa.select(Case).where(Case.testset_id == ts.id).order_by(Case.case_id)))
        public = next(c for c in cases if c.public_sample)
        hidden = [c for c in cases if not c.public_sample]
        subs = {}
        for team_name in ("Alpha", "Beta"):
            team = s.scalar(sa.select(Team).where(Team.name == team_name))
            algo = Algorithm(team_id=team.id, name=f"{team_name.lower()}-seg")
            s.add(algo)
            s.flush()
            subs[team_name] = Submission(algorithm_id=algo.id, testset_id=ts.id, team_id=team.id,
                                         state=SubmissionState.scored, image_sha256=team_name[0].lower() * 64)
            s.add(subs[team_name])
        s.flush()
        for team_name, sub in subs.items():
            predicted = {public.case_id: f"runs/submission-{sub.id}/validation/20260101T000000-0000abcd/output/{public.case_id}"}
            if team_name == "Alpha":
                for case in hidden[:2]:
                    predicted[case.case_id] = f"runs/submission-{sub.id}/shard-0/20260101T010000-0000abcd/output/{case.case_id}"
            for case in cases:
                relative = predicted.get(case.case_id)
                if relative is not None:
                    _write_prediction(storage.path(relative), root / case.case_id, (1, 0, 0))
                    if case is hidden[1]:
                        (storage.path(relative) / "segmentations" / "liver.nii.gz").write_bytes(b"not a nifti file")
                    rows = score_case(case.case_id, case.labels_path, storage.path(relative), nifti_protocol(ts))
                elif not case.public_sample and team_name == "Alpha":
                    rows = worst_rows(case.case_id, nifti_protocol(ts), "missing_prediction", "no folder")
                else:
                    continue
                if not case.public_sample:  # the worker writes a CaseRun for each case of a shard
                    s.add(CaseRun(submission_id=sub.id, case_id=case.id, status="ok" if relative else "missing_output",
                                  detail=relative or f"no folder /output/{case.case_id}"))
                for r in rows:
                    s.add(Score(submission_id=sub.id, case_id=case.id, organ=r.organ, protocol_key=ts.protocol_key,
                                dsc=r.dsc, nsd=r.nsd, hd95=r.hd95, assd=r.assd, status=r.status, detail=r.detail))
        s.commit()
        ids = {"alpha": subs["Alpha"].id, "beta": subs["Beta"].id, "public": public.case_id,
               "good": hidden[0].case_id, "corrupt": hidden[1].case_id, "missing": hidden[2].case_id,
               "hidden": [c.case_id for c in hidden]}
    engine.dispose()
    viewer.caches.clear()
    headers = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    headers["anon"] = {}
    return {"ids": ids, "headers": headers, "tokens": tokens, "roots": (str(tmp_path), str(root)),
            "database_url": str(settings.database_url)}


def _publish_alpha(vworld) -> None:
    """Publish Alpha's submission with its statistics (what an organizer's publish does), so that its
    public submission page exists."""
    engine = create_db_engine(vworld["database_url"], poolclass=sa.pool.NullPool)
    with Session(engine) as s:
        transition(s.get(Submission, vworld["ids"]["alpha"]), "published")
        s.flush()
        on_submission_scored(s, vworld["ids"]["alpha"], StatsOptions(n_resamples=50, group_resamples=50))  # few: speed
        s.commit()
    engine.dispose()


def nifti_protocol(ts):
    from evaluation.protocols import Protocol

    return Protocol.from_dict(ts.protocol_json)


def _page(sub: int, case: str, query: str = "") -> str:
    return f"/viewer/submissions/{sub}/cases/{case}{query}"


def test_viewer_role_matrix(client, vworld):
    ids, headers = vworld["ids"], vworld["headers"]
    A, B = ids["alpha"], ids["beta"]
    own_public = {"anon": 404, "alice": 200, "bob": 404, "ana": 404, "org": 200}
    beta_public = {"anon": 404, "alice": 404, "bob": 200, "ana": 404, "org": 200}
    organizers_only = {"anon": 404, "alice": 404, "bob": 404, "ana": 404, "org": 200}
    nobody = {r: 404 for r in ROLES}
    table = [
        (_page(A, ids["public"]), own_public),
        (_page(A, ids["public"]) + "/axial/10.png", own_public),
        (_page(A, ids["good"]), organizers_only),  # Alpha's own hidden case: 404 for Alpha too
        (_page(A, ids["good"]) + "/coronal/10.png", organizers_only),
        (_page(A, ids["missing"]) + "/sagittal/10.png", organizers_only),
        (_page(B, ids["public"]), beta_public),  # another team's case
        (_page(B, ids["public"]) + "/axial/10.png", beta_public),
        (_page(A, "no-such-case"), nobody),
        (_page(A, "no-such-case") + "/axial/1.png", nobody),
        (_page(999999, ids["public"]), nobody),
        (f"/viewer/submissions/{A}", own_public),
        (f"/viewer/submissions/{B}", beta_public),
    ]
    mismatches, bodies = [], {}
    for path, expected in table:
        for role in ROLES:
            response = client.get(path, headers=headers[role])
            if response.status_code != expected[role]:
                mismatches.append(f"{role} GET {path}: {response.status_code} != {expected[role]}")
            if response.status_code == 200 and path.endswith(".png"):
                assert response.headers["content-type"] == "image/png"
                assert response.headers["cache-control"].startswith("private")
            if response.status_code == 404:
                assert "image" not in response.headers["content-type"]
                text = html.unescape(response.text)
                for case in (ids["public"], ids["good"], ids["missing"], "no-such-case"):
                    text = text.replace(f"'{case}'", "<c>")
                for sub in (A, B, 999999):
                    text = text.replace(f"submission {sub} ", "submission <s> ")
                bodies.setdefault(path.endswith(".png"), set()).add(text)
    assert not mismatches, "\n".join(mismatches)
    # a hidden case is answered exactly as a case that does not exist
    assert len(bodies[True]) == 1 and len(bodies[False]) <= 2, bodies  # pages: the case page and the index page
    # a bad Bearer token is a 401, as everywhere in the API
    assert client.get(_page(A, ids["public"]), headers={"Authorization": "Bearer nope"}).status_code == 401
    _sign_in_cookie_lets_a_browser_load_the_page_and_its_images(client, vworld)
    _worst_cases_on_the_submission_page_link_to_the_viewer(client, vworld)


def _png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_viewer_page_of_a_scored_submission_three_slices_contours_scores(client, vworld):
    ids, org = vworld["ids"], vworld["headers"]["org"]
    A = ids["alpha"]
    response = client.get(_page(A, ids["good"], "?organ=liver"), headers=org)
    assert response.status_code == 200, response.text
    page = response.text
    assert page.count('<img id="slice-') == 3 and "W400/L40" in page
    assert 'id="prediction-note"' not in page and 'id="legend"' in page
    for organ in ("liver", "spleen", "pancreas"):
        assert f"background: #%02x%02x%02x" % slices.ORGAN_COLOURS[organ] in page
    assert not any(r in page for r in vworld["roots"]) and "runs/" not in page  # no server path
    # the default slices go through the liver's centre
    engine = create_db_engine(str(client.app.state.settings.database_url), poolclass=sa.pool.NullPool)
    with Session(engine) as s:
        sub = s.get(Submission, A)
        case = s.scalar(sa.select(Case).where(Case.testset_id == sub.testset_id, Case.case_id == ids["good"]))
        truth = slices.OrganMasks(nifti.read_labels(case.labels_path, untrusted=False))
        scores = {r.organ: r.dsc for r in s.scalars(sa.select(Score).where(Score.submission_id == A, Score.case_id == case.id))}
    engine.dispose()
    centre = truth.centre("liver")
    for plane in slices.PLANES:
        assert f'src="{_page(A, ids["good"])}/{plane}/{centre[slices.PLANE_AXIS[plane]]}.png"' in page
    # the case's per-organ scores, as stored
    assert f"{scores['liver']:.3f}" in page and f"{scores['spleen']:.3f}" in page
    # every slice is a real image with the liver's contours drawn (truth and the shifted prediction)
    liver = np.array(slices.ORGAN_COLOURS["liver"], np.uint8)
    for plane in slices.PLANES:
        image = _png(client.get(f"{_page(A, ids['good'])}/{plane}/{centre[slices.PLANE_AXIS[plane]]}.png", headers=org))
        assert max(image.shape[:2]) == slices.DISPLAY_SIDE_PX and image.std() > 10
        assert np.all(image == liver, axis=2).sum() > 100, plane
    # cached per (case, submission, plane, index): the same bytes, one cache entry
    path = f"{_page(A, ids['good'])}/axial/{centre[2]}.png"
    before = len(viewer.caches.pngs)
    assert client.get(path, headers=org).content == client.get(path, headers=org).content
    assert len(viewer.caches.pngs) == before
    _missing_and_unreadable_predictions_show_the_ct_and_truth_with_a_note(client, vworld)
    _slice_index_and_plane_are_validated(client, vworld)


def _missing_and_unreadable_predictions_show_the_ct_and_truth_with_a_note(client, vworld):
    ids, org = vworld["ids"], vworld["headers"]["org"]
    A = ids["alpha"]
    corrupt = client.get(_page(A, ids["corrupt"]), headers=org)
    assert corrupt.status_code == 200 and 'id="prediction-note"' in corrupt.text
    assert "liver" in corrupt.text and "Fix:" in corrupt.text and not any(r in corrupt.text for r in vworld["roots"])
    missing = client.get(_page(A, ids["missing"]), headers=org)
    assert missing.status_code == 200 and "missing_output" in missing.text
    assert not any(r in missing.text for r in vworld["roots"])
    for case in (ids["corrupt"], ids["missing"]):
        image = _png(client.get(f"{_page(A, case)}/axial/20.png", headers=org))
        assert image.std() > 10  # the CT and the truth still drawn
    # without a prediction the truth is still drawn: the liver's contour through the liver's centre
    page = client.get(_page(A, ids["missing"], "?organ=liver"), headers=org).text
    src = page.split('<img id="slice-axial" src="')[1].split('"')[0]
    liver = np.array(slices.ORGAN_COLOURS["liver"], np.uint8)
    assert np.all(_png(client.get(src, headers=org)) == liver, axis=2).sum() > 50


def _slice_index_and_plane_are_validated(client, vworld):
    ids, alice = vworld["ids"], vworld["headers"]["alice"]
    A = ids["alpha"]
    page = client.get(_page(A, ids["public"]), headers=alice)
    n_axial = int(page.text.split('name="axial" min="0" max="')[1].split('"')[0]) + 1
    out = client.get(f"{_page(A, ids['public'])}/axial/{n_axial}.png", headers=alice)
    assert out.status_code == 422 and f"0..{n_axial - 1}" in out.json()["detail"]
    assert client.get(f"{_page(A, ids['public'])}/axial/-1.png", headers=alice).status_code == 422
    bad_plane = client.get(f"{_page(A, ids['public'])}/oblique/1.png", headers=alice)
    assert bad_plane.status_code == 422 and "axial" in bad_plane.json()["detail"]
    assert client.get(f"{_page(A, ids['public'])}/axial/x.png", headers=alice).status_code == 422
    page_out = client.get(_page(A, ids["public"], f"?axial={n_axial + 5}"), headers=alice)
    assert page_out.status_code == 422 and f"0..{n_axial - 1}" in page_out.text
    assert client.get(_page(A, ids["public"], "?organ=brain"), headers=alice).status_code == 422
    # a hidden case stays 404 even with a bad index (its existence is not confirmed by a 422)
    assert client.get(f"{_page(A, ids['good'])}/axial/99999.png", headers=alice).status_code == 404


def _worst_cases_on_the_submission_page_link_to_the_viewer(client, vworld):
    _publish_alpha(vworld)
    ids, headers = vworld["ids"], vworld["headers"]
    A = ids["alpha"]
    url = f"/leaderboards/ph/submissions/{A}?organ=spleen&metric=dsc"
    org = client.get(url, headers=headers["org"]).text
    assert 'id="worst-cases"' in org
    # the organizer: every case, the missing prediction (DSC 0) first; the corrupt liver file leaves its spleen scored
    first = org.split('id="worst-cases"')[1].split("<tbody>")[1].split("</tr>")[0]
    assert f'href="{_page(A, ids["missing"])}?organ=spleen"' in first
    alice = client.get(url, headers=headers["alice"]).text
    listed = alice.split('id="worst-cases"')[1].split("</table>")[0]
    assert f'{_page(A, ids["public"])}?organ=spleen' in listed
    assert not any(case in listed for case in ids["hidden"])
    for role in ("anon", "ana", "bob"):
        text = client.get(url, headers=headers[role]).text
        assert 'id="worst-cases"' not in text and "/viewer/submissions/" not in text
    # the link works for the one who sees it
    assert client.get(f"{_page(A, ids['public'])}?organ=spleen", headers=headers["alice"]).status_code == 200


def _sign_in_cookie_lets_a_browser_load_the_page_and_its_images(client, vworld):
    ids, token = vworld["ids"], vworld["tokens"]["alice"]
    A = ids["alpha"]
    wrong = client.post("/viewer/sign-in", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401
    signed = client.post("/viewer/sign-in", data={"token": token, "next": "//evil.example/x"}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/leaderboards"
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    jar = {viewer.TOKEN_COOKIE: token}
    assert client.get(_page(A, ids["public"]), cookies=jar).status_code == 200
    assert client.get(f"{_page(A, ids['public'])}/axial/5.png", cookies=jar).status_code == 200
    assert client.get(_page(A, ids["good"]), cookies=jar).status_code == 404
    assert client.get(_page(A, ids["public"]), cookies={viewer.TOKEN_COOKIE: "stale"}).status_code == 404
    client.cookies.clear()


# --- a real headless Chromium -------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class DevTools:
    """Chrome DevTools Protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated
    JSON): Chromium's own transport, so the test needs no websocket client."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        command = (f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-')
        self.process = subprocess.Popen(
            ["bash", "-c", command, chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next = 0
        self.events: list[dict] = []

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe: {self.process.stderr.read()[-2000:]!r}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read())

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def viewer_server(settings, vworld):
    """The app in a real uvicorn process on the test's database and storage (up to 180 s to start:
    the machine may be busy)."""
    with served_app(settings.database_url, settings.data_dir) as base:
        yield base


@pytest.mark.chromium
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the browser part does not depend on the database
def test_viewer_in_headless_chromium_screenshot(vworld, viewer_server, chromium_path, tmp_path):
    base = viewer_server
    ids = vworld["ids"]
    url = f"{base}{_page(ids['alpha'], ids['public'], '?organ=liver')}"
    browser = DevTools(chromium_path, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network"):
            browser.call(f"{domain}.enable", session)
        # the inventor's token on every request of the page, its images included
        browser.call("Network.setExtraHTTPHeaders", session, headers={"Authorization": f"Bearer {vworld['tokens']['alice']}"})
        browser.call("Emulation.setDeviceMetricsOverride", session, width=1400, height=1100, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", session, url=url)
        browser.wait_for("Page.loadEventFired")
        loaded = browser.call("Runtime.evaluate", session, returnByValue=True, expression=(
            "Array.from(document.querySelectorAll('img[id^=slice-]')).map(i => [i.id, i.complete, i.naturalWidth])"))
        images = loaded["result"]["value"]
        assert [i[0] for i in images] == ["slice-axial", "slice-coronal", "slice-sagittal"]
        assert all(complete and width > 100 for _, complete, width in images), images
        boxes = browser.call("Runtime.evaluate", session, returnByValue=True, expression=(
            "Array.from(document.querySelectorAll('img[id^=slice-]')).map(i => {"
            "const r = i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })"))["result"]["value"]
        shot = base64.b64decode(browser.call("Page.captureScreenshot", session, format="png")["data"])
        # the slice chooser swaps the image without reloading the page
        browser.call("Runtime.evaluate", session, expression=(
            "var r = document.querySelector('input[data-plane=axial]'); r.value = 3;"
            "r.dispatchEvent(new Event('input'));"))
        browser.call("Runtime.evaluate", session, awaitPromise=True, expression="new Promise(r => setTimeout(r, 600))")
        src = browser.call("Runtime.evaluate", session, returnByValue=True,
                           expression="document.getElementById('slice-axial').getAttribute('src')")["result"]["value"]
        assert src.endswith("/axial/3.png")
        swapped = browser.call("Runtime.evaluate", session, returnByValue=True, expression=(
            "(i => [i.complete, i.naturalWidth])(document.getElementById('slice-axial'))"))["result"]["value"]
        assert swapped[0] and swapped[1] > 100, swapped
    finally:
        browser.close()
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(float)
    assert pixels.shape[:2] == (1100, 1400)
    assert pixels.std() > 20  # not blank
    # each of the three slice images is on screen, shows a CT (not one flat colour) and contours
    colours = np.array([slices.ORGAN_COLOURS[o] for o in slices.ORGAN_COLOURS], float)
    for left, top, width, height in boxes:
        assert width > 100 and height > 100 and top + height <= 1100 and left + width <= 1400
        region = pixels[int(top) + 1:int(top + height) - 1, int(left) + 1:int(left + width) - 1]
        assert region.std() > 20
        contour = (np.abs(region[:, :, None, :] - colours[None, None]).sum(axis=3) < 30).any(axis=2)
        assert contour.sum() > 50
    keep = os.environ.get("TOUCHSTONE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "case-viewer.png").write_bytes(shot)
