"""Touchstone's 19 published models, imported from result CSVs in Touchstone's format
(``touchstone results import-touchstone``), on the leaderboard page and in the report: in a real
headless Chromium against a real uvicorn server -- the three Touchstone figures per organ, every
figure loaded (not blank), the expected number of figures, screenshots."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_chromium, served_app

pytestmark = [pytest.mark.chromium, pytest.mark.slow]

#: the models of Touchstone's figures (plot/PlotGroup.py model_ranking, without the average)
TOUCHSTONE_MODELS = ("STU-Net", "nnU-Net U-Net", "nnU-Net ResEncL", "MedNeXt", "UniSeg", "Diff-UNet", "LHU-Net",
                     "U-Net & CLIP", "NexToU", "SegResNet", "SwinUNETR & CLIP", "SegVol", "UCTransNet", "UNEST",
                     "SwinUNETR", "UNETR", "SAM-Adapter", "CleanNet", "Swin $UNETR")  # a name with "$": plain text
N_CASES = 12
TOUCHSTONE_FIGURES = ("boxes", "significance", "subgroups")


@pytest.fixture(scope="module")
def touchstone19(tmp_path_factory, writers):
    """A SQLite database with the 19 models imported (12 hidden cases from 3 hospitals; k = 4)."""
    from sqlalchemy.orm import Session

    from services.db import migrate
    from services.db.session import create_db_engine
    from services.importers import import_touchstone
    from services.leaderboard import StatsOptions, recompute_testset

    write_touchstone_dir, write_metadata = writers
    root = tmp_path_factory.mktemp("touchstone19")
    url = f"sqlite:///{root / 'touchstone.db'}"
    migrate.upgrade("head", url)
    levels = {name: 0.70 + 0.012 * i for i, name in enumerate(reversed(TOUCHSTONE_MODELS))}
    engine = create_db_engine(url)
    with Session(engine) as session:
        report = import_touchstone(session, write_touchstone_dir(root / "results", levels, n_cases=N_CASES),
                                   "touchstone-19", metadata=write_metadata(root / "meta.csv", n_cases=N_CASES),
                                   recompute=False)
        from services.db.models import TestSet

        testset = session.query(TestSet).filter_by(name="touchstone-19").one()
        testset.min_group_size = 4  # hospitals of 4 cases are shown
        # fewer bootstrap samples than the default: the figures, not the statistics, are tested here
        recompute_testset(session, testset, submission_ids=report.submission_ids,
                          options=StatsOptions(n_resamples=200, group_resamples=50))
        session.commit()
    engine.dispose()
    return url, root


@pytest.fixture(scope="module")
def server(touchstone19):
    url, root = touchstone19
    with served_app(url, root / "data", root / "uvicorn.log") as base:
        yield base


class _Figures(HTMLParser):
    """figure elements (data-kind), their images and inline svgs."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []
        self.images: list[str] = []
        self.svgs = 0
        self.empty = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and a.get("data-kind"):
            self.kinds.append(a["data-kind"])
        if tag == "img" and "plot" in (a.get("class") or ""):
            self.images.append(a.get("src") or "")
        if tag == "svg":
            self.svgs += 1
        if tag == "p" and "figure-empty" in (a.get("class") or ""):
            self.empty += 1


def _non_blank(png: Path, size: tuple[int, int]) -> None:
    from matplotlib import image

    pixels = image.imread(png)
    assert pixels.shape[:2] == size
    assert pixels[..., :3].std() > 0.05  # not a blank page


def _keep(path: Path, name: str) -> None:
    keep = os.environ.get("TOUCHSTONE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / name).write_bytes(path.read_bytes())


def test_every_organ_page_shows_the_three_touchstone_figures(server):
    from evaluation.labels import ORGANS

    for organ in ("average", *ORGANS):
        page = httpx.get(f"{server}/leaderboards/touchstone-19", params={"organ": organ, "variable": "sex"},
                         timeout=120)
        assert page.status_code == 200, organ
        parser = _Figures()
        parser.feed(page.text)
        assert parser.kinds == ["boxes", "significance", "blobs", "hospitals", "subgroups"], organ
        assert parser.empty == 0, organ  # everything drawn: every group has at least k = 4 hidden cases
        for src in parser.images if organ == "pancreas" else ():  # the SVGs themselves: one organ
            if any(f"/figures/{kind}.svg" in src for kind in TOUCHSTONE_FIGURES):
                figure = httpx.get(server + src.replace("&amp;", "&"), timeout=120)
                assert figure.status_code == 200 and figure.headers["content-type"].startswith("image/svg+xml")
                for name in ("STU-Net", "Swin $UNETR", "CleanNet"):  # all 19, "$" as plain text
                    assert name.replace("&", "&amp;") in figure.text, (organ, src, name)


def test_leaderboard_page_screenshot_with_19_algorithms(server, chromium_path, tmp_path):
    url = f"{server}/leaderboards/touchstone-19?organ=liver&metric=dsc&variable=manufacturer"
    dom = run_chromium(chromium_path, tmp_path, "--dump-dom", url, timeout=240).stdout.decode()
    parser = _Figures()
    parser.feed(dom)
    assert parser.kinds == ["boxes", "significance", "blobs", "hospitals", "subgroups"]
    assert len(parser.images) == 5
    assert dom.count("<tr") >= 19 + 1  # every algorithm in the table
    shot = tmp_path / "leaderboard.png"
    result = run_chromium(chromium_path, tmp_path, f"--screenshot={shot}", "--window-size=1280,6000",
                          "--virtual-time-budget=20000", url, timeout=240)
    assert shot.exists(), result.stderr.decode()[-2000:]
    _non_blank(shot, (6000, 1280))
    # the figures were loaded and drawn: the lower part of the page (figures only) is not blank either
    from matplotlib import image

    pixels = image.imread(shot)
    assert pixels[2500:6000, :, :3].std() > 0.05
    _keep(shot, "leaderboard-19-algorithms.png")


def test_report_screenshot_and_figures(touchstone19, chromium_path, tmp_path):
    from sqlalchemy.orm import Session

    from services import report
    from services.db.session import create_db_engine
    from services.leaderboard import queries

    url, _ = touchstone19
    engine = create_db_engine(url)
    with Session(engine) as session:
        ts = queries.get_testset(session, "touchstone-19")
        html = report.build_report(session, ts, organs=["average"], metrics=["dsc"])
    engine.dispose()
    path = tmp_path / "report.html"
    path.write_text(html)
    parser = _Figures()
    parser.feed(html)
    sections = len(report.SECTION_FIGURES)
    breakdowns = len(["hospital", "age_decade", "sex", "manufacturer"])
    assert len(parser.kinds) == sections + breakdowns
    assert parser.svgs == sections + breakdowns - parser.empty
    dom = run_chromium(chromium_path, tmp_path, "--dump-dom", path.as_uri(), timeout=240).stdout.decode()
    assert dom.count("<svg") == parser.svgs  # Chromium parsed every inline figure
    shot = tmp_path / "report.png"
    result = run_chromium(chromium_path, tmp_path, f"--screenshot={shot}", "--window-size=1200,4000", path.as_uri(),
                          timeout=240)
    assert shot.exists(), result.stderr.decode()[-2000:]
    _non_blank(shot, (4000, 1200))
    _keep(shot, "report-19-algorithms.png")
