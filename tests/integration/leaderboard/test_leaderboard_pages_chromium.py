"""The server-rendered pages in a real headless Chromium against a real uvicorn server:
imported baselines and a scored-then-published submission side by side; a screenshot is taken."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import run_chromium, served_app

pytestmark = pytest.mark.chromium



@pytest.fixture(scope="module")
def server(world):
    """Publish Alpha's submission, then serve the app with uvicorn on a free port of 127.0.0.1."""
    from sqlalchemy.orm import Session

    from services.db.models import Submission
    from services.db.session import create_db_engine
    from services.db.states import transition
    from services.leaderboard import on_submission_scored

    from services.db.models import TestSet

    engine = create_db_engine(world.url)
    with Session(engine) as session:
        # the world's hospitals have 8 hidden cases each: below the default small-cell threshold
        # (10) they would show no bar; test_small_cells.py covers suppression
        session.get(TestSet, session.get(Submission, world.alpha_id).testset_id).min_group_size = 8
        transition(session.get(Submission, world.alpha_id), "published")
        on_submission_scored(session, world.alpha_id)
        session.commit()
    engine.dispose()
    with served_app(world.url, world.root / "data", world.root / "uvicorn.log") as base:
        yield base


def test_leaderboard_page_dom(server, chromium_path, tmp_path):
    result = run_chromium(chromium_path, tmp_path, "--dump-dom", f"{server}/leaderboards/abdomen-ct?organ=liver")
    dom = result.stdout.decode()
    assert "<table" in dom and 'id="leaderboard"' in dom, result.stderr.decode()[-2000:]
    for name in ("AlphaSeg", "nnU-Net", "MedNeXt", "SwinUNETR"):  # scored and imported, together
        assert name in dom
    assert dom.count("baseline</span>") == 3
    assert 'href="/leaderboards/abdomen-ct?organ=pancreas&amp;metric=dsc&amp;method=mean#board"' in dom
    assert "hospital-B" in dom  # per-hospital table
    assert "10.0" in dom or "21.5" in dom  # seconds per case measured for AlphaSeg (mean 21.5 s)


def test_submission_page_plots_and_screenshot(server, chromium_path, tmp_path, world):
    url = f"{server}/leaderboards/abdomen-ct/submissions/{world.alpha_id}?organ=liver&metric=dsc"
    dom = run_chromium(chromium_path, tmp_path, "--dump-dom", url).stdout.decode()
    for figure in ("box-plots", "significance", "rank-blobs", "hospital-bars"):
        assert f'id="{figure}"' in dom
    assert dom.count("<svg") >= 4
    shot = tmp_path / "submission.png"
    result = run_chromium(chromium_path, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.exists(), result.stderr.decode()[-2000:]
    assert shot.stat().st_size > 20_000
    from matplotlib import image

    pixels = image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    # keep a copy for people to look at
    keep = os.environ.get("TOUCHSTONE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "leaderboard-submission.png").write_bytes(shot.read_bytes())


def test_hidden_submission_page_is_404_for_the_public(server, world):
    from services.db.models import Submission  # noqa: F401  (documentation: Alpha is published here)

    assert httpx.get(f"{server}/leaderboards/abdomen-ct/submissions/999999").status_code == 404
    assert httpx.get(f"{server}/leaderboards/nope").status_code == 404
    assert httpx.get(f"{server}/leaderboards/abdomen-ct?organ=brain").status_code == 422
    assert httpx.get(f"{server}/static/style.css").status_code == 200
