"""Small-cell suppression (services.leaderboard.suppression) end to end: API, exports, pages and
their SVG figures, CLI, organizer overrides, and test sets with fewer hidden cases than k.

Two extra test sets are imported into this module's world (import-touchstone: their cases are
hidden cases): ``small-cells`` (30 cases: hospitals of 1, 2, 11 and 16 cases, the big one named
with ``$...$``; sex M 3 cases, F 27) and ``tiny`` (3 hidden cases in all). k is the default, 10.
The 1- and 2-case hospitals are small; the 11-case one is suppressed as their complement (together
they hold 14 >= k cases, so no group can be computed from the overall mean by subtraction); the
16-case one stays visible. Sex M is small, so F is its complement.
"""

from __future__ import annotations

import csv
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

API = "/api/v1/leaderboards"
BIG = "St. $x^2$ Hospital"
MID = "Mid Clinic"
SMALL = ("tiny-1", "pair-2")
N_SMALL_CELLS = 30
VIEWERS = (None, "alice", "ana")  # the public, an inventor, an analyst
#: numbers a suppressed row may still carry: who it is, not what it scored
IDENTITY = {"submission_id"}


def _hospital(i: int) -> str:
    return "tiny-1" if i == 0 else "pair-2" if i in (1, 2) else MID if i < 14 else BIG


@pytest.fixture(scope="module")
def small(world, writers):
    """Import the two test sets into the world's database; returns {"small-cells": ids, "tiny": ids}."""
    from sqlalchemy.orm import Session

    from services.db.models import Case, Score
    from services.db.session import create_db_engine
    from services.importers import import_touchstone

    write_touchstone_dir = writers[0]
    root = world.root
    meta = root / "small-meta.csv"
    with open(meta, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "hospital", "sex"])
        for i in range(N_SMALL_CELLS):
            writer.writerow([f"BDMAP_{i:08d}", _hospital(i), "M" if i < 3 else "F"])
    tiny_meta = root / "tiny-meta.csv"
    tiny_meta.write_text("case_id,hospital\n" + "".join(f"BDMAP_{i:08d},H{i % 2}\n" for i in range(3)))
    engine = create_db_engine(world.url)
    ids = {}
    with Session(engine) as session:
        ids["small-cells"] = import_touchstone(
            session, write_touchstone_dir(root / "small", {"Alpha1": 0.8, "Beta2": 0.85}, n_cases=N_SMALL_CELLS, seed=1),
            "small-cells", metadata=meta).submission_ids
        ids["tiny"] = import_touchstone(
            session, write_touchstone_dir(root / "tiny", {"Gamma3": 0.7, "Delta4": 0.9}, n_cases=3, seed=2),
            "tiny", metadata=tiny_meta).submission_ids
        # a scored public-sample case on abdomen-ct: what analysts may see per case
        public = session.scalar(sa.select(Case).where(Case.case_id == "public_00001"))
        session.add(Score(submission_id=world.baseline_ids[0], case_id=public.id, organ="liver",
                          protocol_key="touchstone@1", dsc=0.5, nsd=0.5, status="ok"))
        session.commit()
    engine.dispose()
    return ids


def _numbers(obj, path=""):
    """(path, value) of every int/float (bools excepted) in a JSON value, identity keys skipped."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key not in IDENTITY:
                yield from _numbers(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _get(client, world, path, who=None, **params):
    response = client.get(path, params=params, headers=world.headers(who))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("who", VIEWERS)
@pytest.mark.parametrize("organ, metric", [("liver", "dsc"), ("average", "nsd")])
def test_small_hospitals_show_no_number(world, client, small, who, organ, metric):
    body = _get(client, world, f"{API}/small-cells/hospitals", who, organ=organ, metric=metric)
    assert body["min_group_size"] == 10
    rows = body["rows"]
    assert {r["group"] for r in rows} == {*SMALL, MID, BIG} and len(rows) == 2 * 4
    secret = _get(client, world, f"{API}/small-cells/hospitals", "org", organ=organ, metric=metric, scope="all")
    text = json.dumps(body)
    for row in rows:
        if row["group"] in SMALL:
            assert row["suppressed"] is True and row["n"] == "< 10"
            assert list(_numbers(row)) == [], row
        elif row["group"] == MID:  # the complement of the small ones
            assert row["suppressed"] is True and row["n"] == "suppressed"
            assert list(_numbers(row)) == [], row
        else:
            assert row["suppressed"] is False and row["n"] == 16 and row["mean"] is not None
            assert row["mean_ci_low"] <= row["mean"] <= row["mean_ci_high"]
    # no statistic of a suppressed group appears anywhere in the answer
    for row in secret["rows"]:
        if row["group"] in (*SMALL, MID):
            for name in ("mean", "median", "mean_ci_low", "mean_ci_high", "median_ci_low", "median_ci_high", "std"):
                if row[name] is not None:
                    assert json.dumps(row[name]) not in text, (name, row)


def test_organizers_see_every_number_with_the_flag(world, client, small):
    body = _get(client, world, f"{API}/small-cells/hospitals", "org", organ="liver", scope="all")
    by = {(r["label"], r["group"]): r for r in body["rows"]}
    tiny = by[("Alpha1", "tiny-1")]
    assert tiny["suppressed"] is True and tiny["n"] == 1
    # the leak this closes: the mean of a one-case hospital is that hidden case's score
    with open(world.root / "small" / "Alpha1" / "dsc.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    assert tiny["mean"] == pytest.approx(float(first["liver"]))
    pair = by[("Alpha1", "pair-2")]
    assert pair["suppressed"] is True and pair["n"] == 2 and pair["mean_ci_low"] is not None
    assert by[("Alpha1", MID)]["suppressed"] is True and by[("Alpha1", MID)]["n"] == 11
    assert by[("Alpha1", BIG)]["suppressed"] is False
    # scope=published is the public's view, for organizers too
    public = _get(client, world, f"{API}/small-cells/hospitals", "org", organ="liver")
    assert {r["n"] for r in public["rows"] if r["group"] in SMALL} == {"< 10"}


@pytest.mark.parametrize("who", VIEWERS)
def test_small_subgroups_show_no_number(world, client, small, who):
    body = _get(client, world, f"{API}/small-cells/subgroups/sex", who, organ="liver")
    for row in body["rows"]:
        if row["group"] == "M":  # 3 cases
            assert row["suppressed"] and row["n"] == "< 10" and list(_numbers(row)) == []
        else:  # 27 cases, but overall minus F would be M: suppressed as its complement
            assert row["group"] == "F" and row["suppressed"] and row["n"] == "suppressed"
            assert list(_numbers(row)) == []
    # the overall table of a 30-case test set stays public
    board = _get(client, world, f"{API}/small-cells", who, organ="liver")
    assert board["suppressed"] is False and all(e["mean"] is not None and e["rank"] for e in board["entries"])


def _csv_rows(client, world, who, testset, level, scope="published"):
    response = client.get(f"/api/v1/exports/{testset}", params={"level": level, "scope": scope},
                          headers=world.headers(who))
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.text)))


STATS = ("n_failed", "n_missing", "mean", "median", "std", "mean_ci_low", "mean_ci_high", "median_ci_low",
         "median_ci_high")


def test_group_exports_hide_small_groups_from_analysts(world, client, small):
    from services import exports

    rows = _csv_rows(client, world, "ana", "small-cells", "hospital")
    assert rows and list(rows[0]) == exports.COLUMNS["hospital"]
    for row in rows:
        if row["group"] in SMALL:
            assert row["n"] == "< 10" and row["suppressed"] == "True"
            assert all(row[c] == "" for c in STATS), row
        elif row["group"] == MID:
            assert row["n"] == "suppressed" and row["suppressed"] == "True"
            assert all(row[c] == "" for c in STATS), row
        else:
            assert int(row["n"]) + int(row["n_missing"]) == 16 and row["suppressed"] == "False" and row["mean"] != ""
    sub = _csv_rows(client, world, "ana", "small-cells", "subgroup")
    assert {r["n"] for r in sub if r["group"] == "M"} == {"< 10"}
    assert {r["n"] for r in sub if r["group"] == "F"} == {"suppressed"}
    assert all(r[c] == "" for r in sub if r["group"] in ("M", "F") for c in STATS)
    # organizers (scope=all): every number, flagged
    org = _csv_rows(client, world, "org", "small-cells", "hospital", scope="all")
    assert {r["n"] for r in org if r["group"] == "tiny-1"} == {"1"}
    assert all(r["mean"] != "" and r["suppressed"] == "True" for r in org if r["group"] in SMALL)
    # Parquet: the integer n is null where suppressed; the threshold is in the file metadata
    response = client.get("/api/v1/exports/small-cells", params={"level": "hospital", "format": "parquet"},
                          headers=world.headers("ana"))
    table = pq.read_table(pa.BufferReader(response.content))
    assert table.schema.metadata[b"touchstone.min_group_size"] == b"10"
    for row in table.to_pylist():
        if row["group"] in (*SMALL, MID):
            assert row["suppressed"] and row["n"] is None and all(row[c] is None for c in STATS)
        else:
            assert row["n"] + row["n_missing"] == 16 and row["mean"] is not None


def test_analysts_get_no_hidden_case(world, client, small, session):
    from services.db.models import Case

    hidden = set(session.scalars(sa.select(Case.case_id).where(Case.public_sample.is_(False))))
    rows = _csv_rows(client, world, "ana", "abdomen-ct", "case")
    assert [r["case_id"] for r in rows] == ["public_00001"]
    for testset in ("small-cells", "tiny"):
        assert _csv_rows(client, world, "ana", testset, "case") == []
    per_case = _get(client, world, f"{API}/abdomen-ct/submissions/{world.baseline_ids[0]}/cases", "ana")
    assert [i["case_id"] for i in per_case["items"]] == ["public_00001"]
    everything = _get(client, world, f"{API}/abdomen-ct/submissions/{world.baseline_ids[0]}/cases", "org")
    assert {i["case_id"] for i in everything["items"]} - {"public_00001"} <= hidden
    assert everything["total"] == 24 * 9 - 1 + 1  # one empty cell in the files, one public-sample score
    org_rows = _csv_rows(client, world, "org", "abdomen-ct", "case", scope="all")
    assert len({r["case_id"] for r in org_rows} & hidden) == 24


def _section(html: str, element_id: str) -> str:
    start = html.index(f'id="{element_id}"')
    return html[start:html.index("</section>", start)]


def test_leaderboard_page_shows_no_number_of_a_small_hospital(world, client, small):
    html = client.get("/leaderboards/small-cells", params={"organ": "liver"}).text
    table = _section(html, "hospitals")
    header = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", table.split("</thead>")[0])
    assert header[0] == "algorithm" and set(header[1:]) == {*SMALL, MID, BIG}
    rows = re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", table.split("<tbody>")[1], flags=re.S)
    assert {label for label, _ in rows} == {"Alpha1", "Beta2"}
    for _, cells in rows:
        values = re.findall(r"<td([^>]*)>(.*?)</td>", cells, flags=re.S)
        for group, (attributes, content) in zip(header[1:], values):
            if group in (*SMALL, MID):
                assert "suppressed" in content and 'data-value=""' in attributes
                assert not re.search(r"\d", content.replace("&lt; 10", "")), content
            else:
                assert re.search(r"0\.\d{3}", content) and "n=16" in content


def test_submission_page_bars_leave_small_hospitals_out(world, client, small):
    sid = small["small-cells"][0]
    response = client.get(f"/leaderboards/small-cells/submissions/{sid}", params={"organ": "liver"})
    assert response.status_code == 200, response.text[-2000:]
    html = response.text
    figure = html[html.index('id="hospital-bars"'):]
    svg = figure[:figure.index("</svg>")]
    # "$x^2$" drawn as written, not as mathtext (matplotlib also writes each string in a comment)
    assert f"{BIG} (n=16)" in re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    for group in (*SMALL, MID):
        assert f"{group} (n=" not in svg and group not in svg
    caption = figure[figure.index("<figcaption>"):figure.index("</figcaption>")]
    assert "tiny-1" in caption and "pair-2" in caption and MID in caption
    assert 'id="box-plots"' in html and 'id="significance"' in html


def test_an_organizer_sets_k(world, client, small):
    path = "/api/v1/testsets/small-cells"
    org = world.headers("org")

    def small_ns():
        rows = _get(client, world, f"{API}/small-cells/hospitals", None, organ="liver")["rows"]
        return {r["group"]: r["n"] for r in rows}

    assert client.patch(path, json={"min_group_size": 2}, headers=world.headers("alice")).status_code == 403
    assert client.patch(path, json={"min_group_size": 0}, headers=org).status_code == 422
    assert client.patch(path, json={"min_group_size": 1_000_001}, headers=org).status_code == 422
    try:
        response = client.patch(path, json={"min_group_size": 2}, headers=org)
        assert response.status_code == 200, response.text
        assert response.json()["min_group_size"] == 2
        # tiny-1 alone (1 case) is below 2: its smallest neighbour hides with it
        assert small_ns() == {"tiny-1": "< 2", "pair-2": "suppressed", MID: 11, BIG: 16}
        assert client.patch(path, json={"min_group_size": 13}, headers=org).status_code == 200
        # 1 + 2 + 11 = 14 >= 13 cases suppressed together: the 16-case hospital stays
        assert small_ns() == {"tiny-1": "< 13", "pair-2": "< 13", MID: "< 13", BIG: 16}
        assert client.patch(path, json={"min_group_size": 17}, headers=org).status_code == 200
        assert small_ns() == {"tiny-1": "< 17", "pair-2": "< 17", MID: "< 17", BIG: "< 17"}
        # 30 hidden cases >= 17: the overall table stays; at 31 it goes
        assert _get(client, world, f"{API}/small-cells", None)["suppressed"] is False
        assert client.patch(path, json={"min_group_size": 31}, headers=org).status_code == 200
        assert _get(client, world, f"{API}/small-cells", None)["suppressed"] is True
        assert client.patch(path, json={"min_group_size": 1}, headers=org).status_code == 200
        assert small_ns() == {"tiny-1": 1, "pair-2": 2, MID: 11, BIG: 16}
    finally:
        assert client.patch(path, json={"min_group_size": 10}, headers=org).status_code == 200
    assert small_ns() == {"tiny-1": "< 10", "pair-2": "< 10", MID: "suppressed", BIG: 16}


@pytest.mark.parametrize("who", VIEWERS)
def test_a_test_set_smaller_than_k_shows_no_statistic(world, client, small, who):
    base = f"{API}/tiny"
    for organ in ("average", "liver"):
        for method in ("mean", "median", "rank-mean", "test"):
            board = _get(client, world, base, who, organ=organ, method=method)
            assert board["suppressed"] is True and len(board["entries"]) == 2
            assert [e["label"] for e in board["entries"]] == ["Delta4", "Gamma3"]  # by label, not by rank
            assert all(e["n"] == "< 10" and e["rank"] is None and e["organs"] == {} for e in board["entries"])
            assert list(_numbers(board["entries"])) == []
            assert (board["run"] or {}).get("kendall_tau") is None
    sig = _get(client, world, f"{base}/significance", who, organ="liver")
    assert sig["suppressed"] and sig["pairs"] == [] and list(_numbers(sig["p_adjusted"])) == []
    assert sig["significant"] == [[None, None], [None, None]]
    for method in ("mean", "rank-mean"):
        stab = _get(client, world, f"{base}/stability", who, organ="liver", method=method)
        assert stab["suppressed"] and stab["kendall_tau"] is None and list(_numbers(stab["entries"])) == []
    for variable in ("hospitals", "subgroups/hospital"):
        rows = _get(client, world, f"{base}/{variable}", who)["rows"]
        assert len(rows) == 4 and all(r["suppressed"] for r in rows) and list(_numbers(rows)) == []
    summary = _get(client, world, f"{base}/submissions/{small['tiny'][0]}", who)
    assert summary["suppressed"] and summary["aggregates"]
    assert list(_numbers(summary["aggregates"])) == [] and all(r["rank"] is None for r in summary["ranks"])


def test_organizers_see_a_small_test_set(world, client, small):
    board = _get(client, world, f"{API}/tiny", "org", organ="liver", scope="all")
    assert board["suppressed"] is True and [e["rank"] for e in board["entries"]] == [1, 2]
    assert all(e["n"] == 3 and e["mean"] is not None for e in board["entries"])
    sig = _get(client, world, f"{API}/tiny/significance", "org", organ="liver", scope="all")
    assert len(sig["pairs"]) == 2 and sig["suppressed"]
    summary = _get(client, world, f"{API}/tiny/submissions/{small['tiny'][0]}", "org")
    assert all(isinstance(a["mean"], float) for a in summary["aggregates"])


def test_small_test_set_pages_and_exports(world, client, small):
    html = client.get("/leaderboards/tiny", params={"organ": "liver"}).text
    assert 'id="suppressed"' in html
    board = _section(html, "board")
    body = board[board.index("<tbody>"):board.index("</tbody>")]
    cells = re.sub(r"<[^>]+>", " ", body).replace("&lt; 10", "")
    assert not re.search(r"\d\.\d", cells), cells  # no score, CI, rank interval
    sid = small["tiny"][0]
    page = client.get(f"/leaderboards/tiny/submissions/{sid}", params={"organ": "liver"})
    assert page.status_code == 200
    assert 'id="suppressed"' in page.text and "<svg" not in page.text
    summary = _section(page.text, "summary")
    summary = re.sub(r'<p class="muted statistics">.*?</p>', "", summary, flags=re.S)  # names options, not scores
    assert not re.search(r"\d\.\d", re.sub(r"<[^>]+>", " ", summary)), summary
    rows = _csv_rows(client, world, "ana", "tiny", "hospital")
    assert rows and all(r["suppressed"] == "True" and r["mean"] == "" for r in rows)


def test_cli_prints_what_the_api_shows(world, client, small, cli_env, tmp_path):
    from services.cli.main import app as cli

    runner = CliRunner()
    result = runner.invoke(cli, ["leaderboard", "tiny", "--organ", "liver", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == _get(client, world, f"{API}/tiny", None, organ="liver")
    result = runner.invoke(cli, ["stats", "tiny", "--format", "json"])
    assert json.loads(result.stdout)["significance"]["pairs"] == []
    table = runner.invoke(cli, ["leaderboard", "tiny"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "suppressed" in table.output
    assert not re.search(r"0\.\d{4}", table.stdout)
    out = tmp_path / "hospital.csv"
    result = runner.invoke(cli, ["export", "small-cells", "--level", "hospital", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out)))
    assert {r["n"] for r in rows if r["group"] in SMALL} == {"< 10"}
    assert all(r["mean"] == "" for r in rows if r["group"] in SMALL)
    result = runner.invoke(cli, ["export", "small-cells", "--level", "hospital", "--scope", "all", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert {r["n"] for r in rows if r["group"] == "pair-2"} == {"2"}


@pytest.mark.parametrize("who", VIEWERS)
@pytest.mark.parametrize("variable", ["hospitals", "subgroups/sex", "subgroups/hospital"])
def test_no_suppressed_group_comes_back_by_subtraction(world, client, small, who, variable):
    """The attack: N * overall mean - sum of n_g * mean_g over the visible groups = the suppressed
    groups' sum. That sum must cover at least k hidden cases, and must not be any small group's
    own value (the organizers' numbers say what it would have been)."""
    for organ in ("liver", "average"):
        public = _get(client, world, f"{API}/small-cells/{variable}", who, organ=organ)["rows"]
        secret = _get(client, world, f"{API}/small-cells/{variable}", "org", organ=organ, scope="all")["rows"]
        board = {e["submission_id"]: e for e in _get(client, world, f"{API}/small-cells", who, organ=organ)["entries"]}
        for sid, entry in board.items():
            mine = [r for r in public if r["submission_id"] == sid]
            truth = {r["group"]: r for r in secret if r["submission_id"] == sid}
            hidden_total = sum(truth[r["group"]]["n"] for r in mine if r["suppressed"])
            assert hidden_total == 0 or hidden_total >= 10, (organ, sid, hidden_total)
            visible = [r for r in mine if not r["suppressed"]]
            rest_n = entry["n"] - sum(r["n"] for r in visible)
            rest = entry["mean"] * entry["n"] - sum(r["mean"] * r["n"] for r in visible)
            assert rest_n == hidden_total
            for group in SMALL + ("M",):
                if group in truth and rest_n:
                    assert rest / rest_n != pytest.approx(truth[group]["mean"], abs=1e-9), (organ, group)


def test_an_entry_over_fewer_than_k_cases_is_a_small_cell(world, client, small):
    """Case 3's gall bladder is empty in every file: the gall-bladder table summarises 29 cases.
    At k = 30 the test set (30 hidden cases) stays public, its gall-bladder means do not."""
    path, org = "/api/v1/testsets/small-cells", world.headers("org")
    try:
        assert client.patch(path, json={"min_group_size": 30}, headers=org).status_code == 200
        liver = _get(client, world, f"{API}/small-cells", None, organ="liver")
        assert liver["suppressed"] is False and all(isinstance(e["mean"], float) for e in liver["entries"])
        gall = _get(client, world, f"{API}/small-cells", None, organ="gall_bladder")
        assert all(e["n"] == "< 30" and e["suppressed"] for e in gall["entries"])
        assert [n for e in gall["entries"] for _, n in _numbers({k: e[k] for k in ("mean", "median", "std", "value",
                                                                                 "mean_ci_low", "mean_ci_high")})] == []
        organizer = _get(client, world, f"{API}/small-cells", "org", organ="gall_bladder", scope="all")
        assert all(isinstance(e["mean"], float) for e in organizer["entries"])
    finally:
        assert client.patch(path, json={"min_group_size": 10}, headers=org).status_code == 200
