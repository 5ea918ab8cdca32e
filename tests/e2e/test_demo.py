"""End to end: ``touchstone demo --no-serve`` as a newcomer runs it (a real CLI process starting the
real embedded stack: SQLite, the filesystem broker, Celery worker processes, the API, the Docker
engine), twice in a row on the same folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = "classical,trivial,garbage"


@pytest.fixture(scope="module")
def demo_images(docker_client, base_image) -> None:
    """The example images the demo submits (scripts/build-examples.sh; cached layers make it cheap)."""
    subprocess.run(["bash", str(ROOT / "scripts/build-examples.sh"), base_image, "--only", EXAMPLES],
                   check=True, capture_output=True, timeout=900)


def _run_demo(data_dir: Path, cases: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOUCHSTONE_") or k == "TOUCHSTONE_BASE_IMAGE"}
    env["COLUMNS"] = "160"
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "demo", "--no-serve", "--cases", str(cases), "--port", "0",
         "--data-dir", str(data_dir), "--timeout", "600"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def _check(result: subprocess.CompletedProcess, data_dir: Path, cases: int) -> dict:
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                     for p in sorted((data_dir / "logs").glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}\n{logs}"
    summary = json.loads((data_dir / "summary.json").read_text())
    subs = {s["algorithm"]: s for s in summary["submissions"]}

    # the two working algorithms were published; the garbage writer failed validation, saying why
    assert subs["classical-hu-priors"]["state"] == "published"
    assert subs["threshold-baseline"]["state"] == "published"
    garbage = subs["random-bytes"]
    assert garbage["state"] == "failed"
    assert "Validation on the public sample failed" in garbage["failure_reason"]
    assert "not a NIfTI file" in garbage["failure_reason"]
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert "random-bytes) failed -- as expected" in out
    assert "not a NIfTI file" in out

    # the public leaderboard holds exactly the two published algorithms, with plausible scores
    entries = {e["algorithm"]: e for e in summary["leaderboard"]["entries"]}
    assert set(entries) == {"classical-hu-priors", "threshold-baseline"}
    hidden = cases - summary["public_sample"]
    classical, trivial = entries["classical-hu-priors"], entries["threshold-baseline"]
    for entry in (classical, trivial):
        assert entry["n"] == hidden and entry["n_failed"] == 0
        assert 0.0 <= entry["mean_ci_low"] <= entry["mean"] <= entry["mean_ci_high"] <= 1.0
        assert entry["rank_median"] is not None and entry["p_best"] is not None
    # the classical segmenter finds every organ roughly; the threshold only liver and aorta, poorly
    assert classical["mean"] > 0.6
    assert trivial["mean"] < 0.3
    assert classical["rank"] == 1 and trivial["rank"] == 2
    assert classical["p_best"] > 0.9

    # significance and rank stability were computed and printed
    printed = summary["printed"]
    pair = next(p for p in printed["significance"]["pairs"] if p["a_label"] == "classical-hu-priors")
    assert pair["n_common"] == hidden and pair["mean_difference"] > 0.3
    assert pair["p_adjusted"] is not None and 0 < pair["p_adjusted"] <= 1
    assert [e["label"] for e in printed["stability"]["entries"]] == ["classical-hu-priors", "threshold-baseline"]
    for text in ("Leaderboard demo-phantoms", "paired one-sided Wilcoxon", "rank stability", "classical-hu-priors"):
        assert text in out, text

    # the static report holds the leaderboard page with both algorithms and links to their pages
    report = (data_dir / "report" / "index.html").read_text()
    assert "classical-hu-priors" in report and "threshold-baseline" in report and "<style>" in report
    for sid in (classical["submission_id"], trivial["submission_id"]):
        assert f'href="submission-{sid}.html"' in report
        assert (data_dir / "report" / f"submission-{sid}.html").exists()
    # the subprocesses are gone
    assert not (data_dir / "pids.json").exists()
    return summary


def test_demo_twice_in_a_row(demo_images, tmp_path):
    data_dir = tmp_path / "demo"
    cases = 8
    first = _check(_run_demo(data_dir, cases), data_dir, cases)
    tarballs = sorted(p.name for p in (data_dir / "images").glob("*.tar"))
    assert len(tarballs) == 3
    second = _check(_run_demo(data_dir, cases), data_dir, cases)
    # a fresh deployment each time (ids start again), the same tarballs reused from the cache
    assert [s["id"] for s in second["submissions"]] == [s["id"] for s in first["submissions"]]
    assert sorted(p.name for p in (data_dir / "images").glob("*.tar")) == tarballs
    # deterministic phantoms and algorithms: the same scores
    assert [e["mean"] for e in second["leaderboard"]["entries"]] == pytest.approx(
        [e["mean"] for e in first["leaderboard"]["entries"]])


def test_demo_refuses_a_foreign_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    result = subprocess.run([sys.executable, "-m", "services.cli.main", "demo", "--data-dir", str(folder)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "was not made by `touchstone demo`" in " ".join(result.stderr.split())
    assert (folder / "thesis.tex").read_text() == "precious"
