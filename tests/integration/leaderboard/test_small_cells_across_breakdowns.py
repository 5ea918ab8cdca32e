"""Small-cell suppression across breakdowns, end to end (the review's attack, issue 15's rule).

Hospital A (cases 0-10) lies inside manufacturer GE (cases 0-11), and hospital B holds one case
(11). Blanking B and its complements per breakdown leaves A and GE visible, and
``n_GE·mean_GE - n_A·mean_A`` is case 11's score. The statistics step now withholds groups across
every breakdown (``services.leaderboard.suppression.withheld_groups``): this test is the attack,
through the anonymous API and the analysts' export, and requires that it yields nothing.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import sqlalchemy as sa
from fastapi.testclient import TestClient

import tests.integration.leaderboard.conftest as lb

API = "/api/v1/leaderboards/abdomen-ct"


def nested_metadata(path, n_cases=lb.N_CASES):
    def hospital(i):
        return "hospital-A" if i <= 10 else "hospital-B" if i == 11 else "hospital-C" if i <= 20 else "hospital-D"
    with open(path, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["case_id", "hospital", "age", "sex", "manufacturer"])
        for i in range(n_cases):
            w.writerow([f"BDMAP_{i:08d}", hospital(i), 25 + 2 * i, "FM"[i % 2], "GE" if i < 12 else "Siemens"])
    return path


def _sums(rows):
    """(group -> (n, n·mean)) of one submission's visible groups."""
    return {r["group"]: (r["n"], r["n"] * r["mean"]) for r in rows if r["mean"] is not None}


def test_nested_breakdowns_give_no_hidden_case_back(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "write_metadata", nested_metadata)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    lb.use_database(monkeypatch, url, tmp_path / "data")
    world = lb.build_world(url, tmp_path)
    from services.api.app import create_app
    from services.config import Settings
    from services.db.models import Case, Score
    from services.db.session import create_db_engine
    from sqlalchemy.orm import Session

    client = TestClient(create_app(Settings(database_url=url, data_dir=tmp_path / "data")))
    params = {"organ": "liver", "metric": "dsc"}
    tables = {"hospital": client.get(f"{API}/hospitals", params=params).json()["rows"],
              "manufacturer": client.get(f"{API}/subgroups/manufacturer", params=params).json()["rows"]}
    with Session(create_db_engine(url)) as session:
        truth = {sid: dict(session.execute(
            sa.select(Case.case_id, Score.dsc).join(Case, Case.id == Score.case_id)
            .where(Score.submission_id == sid, Score.organ == "liver", Case.public_sample.is_(False))).all())
            for sid in world.baseline_ids}
    for sid in world.baseline_ids:
        visible = {v: _sums([r for r in rows if r["submission_id"] == sid]) for v, rows in tables.items()}
        assert "hospital-B" not in visible["hospital"]
        # every difference of a visible group and a visible group inside it (A in GE, C/D in
        # Siemens, any of them in the overall row) covers no case alone
        overall = (sum(truth[sid].values()), len(truth[sid]))
        for outer in [("overall", (overall[1], overall[0]))] + list(visible["manufacturer"].items()):
            for inner, (n_in, s_in) in visible["hospital"].items():
                n_out, s_out = outer[1]
                if n_out - n_in == 1:
                    leaked = s_out - s_in
                    assert not np.isclose(list(truth[sid].values()), leaked, atol=1e-9).any(), (outer[0], inner)
        # and the review's exact attack has at least one of its two inputs blanked
        assert "hospital-A" not in visible["hospital"] or "GE" not in visible["manufacturer"]
    # the analysts' hospital export blanks exactly what the API blanks (the same stored flag)
    headers = {"Authorization": f"Bearer {world.tokens['ana']}"}
    export = client.get("/api/v1/exports/abdomen-ct", params={"level": "hospital", "format": "csv"}, headers=headers)
    assert export.status_code == 200, export.text
    exported = {(int(r["submission_id"]), r["group"]): r["mean"] == ""
                for r in csv.DictReader(io.StringIO(export.text)) if r["organ"] == "liver" and r["metric"] == "dsc"}
    api = {(r["submission_id"], r["group"]): r["mean"] is None for r in tables["hospital"]}
    assert exported and {key: exported[key] for key in api} == api
