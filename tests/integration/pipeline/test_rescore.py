"""End to end: a submission run by the real Docker engine and scored under touchstone@1 is
re-scored through the organizers' API under touchstone@2 (another NSD tolerance, an organizer's
protocol file inside the import roots) by the real Celery cpu worker -- no container started --
and both versions are readable through the leaderboard API."""

from __future__ import annotations

import time

import pytest
import yaml

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _touchstone_containers(docker_client, stack) -> set[str]:
    """Every container (running or not) of this stack: a Touchstone submission label and a mount in
    the stack's data folder (other tests on the same engine have containers of their own)."""
    found = set()
    for container in docker_client.containers.list(all=True, filters={"label": "touchstone.submission"}):
        mounts = container.attrs.get("Mounts") or []
        if any(str(m.get("Source", "")).startswith(str(stack.data_dir)) for m in mounts):
            found.add(container.id)
    return found


def test_rescore_without_containers_both_versions_readable(embedded_stack, phantom_manifest, example_images,
                                                           docker_client, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from evaluation.protocols import PRESETS
    from services.api.app import create_app
    from services.config import get_settings
    from services.db.accounts import create_user
    from services.db.session import session_scope

    stack = embedded_stack
    stack.add_testset("phantoms", phantom_manifest)
    stack.start_workers()
    submission_id = stack.submit("phantoms", image_ref=example_images["classical"])
    summary = stack.wait(submission_id, timeout=240)
    assert summary["state"] == "scored", (summary, stack.logs())
    before = _touchstone_containers(docker_client, stack)

    # the organizer's second protocol version: touchstone@1 with an 8 mm NSD tolerance (the tiny
    # phantoms have 5.5 x 5.5 x 6.8 mm voxels: 1.5 and 4 mm count the same surface points)
    roots = tmp_path / "imports"
    roots.mkdir()
    protocol = PRESETS["touchstone"].to_dict()
    protocol.update(version=2, metrics=list(protocol["metrics"]),
                    nsd_tolerance_mm={organ: 8.0 for organ in protocol["nsd_tolerance_mm"]})
    (roots / "touchstone-v2.yaml").write_text(yaml.safe_dump(protocol, sort_keys=False))
    monkeypatch.setenv("TOUCHSTONE_IMPORT_ROOTS", str(roots))
    get_settings.cache_clear()
    with session_scope() as session:
        tokens = {role: create_user(session, f"rescore-{role}", role, "rescore-team" if role == "inventor" else None)[1]
                  for role in ("organizer", "inventor", "analyst")}
    client = TestClient(create_app(get_settings()))

    def auth(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[role]}"}

    body = {"protocol": str(roots / "touchstone-v2.yaml")}
    # organizers only
    assert client.post("/api/v1/testsets/phantoms/rescore", json=body).status_code == 401
    for role in ("inventor", "analyst"):
        answer = client.post("/api/v1/testsets/phantoms/rescore", json=body, headers=auth(role))
        assert answer.status_code == 403, answer.text
    # a protocol file outside the import roots is refused, naming the fix
    outside = client.post("/api/v1/testsets/phantoms/rescore", json={"protocol": str(phantom_manifest)},
                          headers=auth("organizer"))
    assert outside.status_code == 422 and "TOUCHSTONE_IMPORT_ROOTS" in outside.json()["detail"]

    started = client.post("/api/v1/testsets/phantoms/rescore", json=body, headers=auth("organizer"))
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["protocol_key"] == "touchstone@2" and job["submission_ids"] == [submission_id]
    assert job["unavailable"] == [] and job["n_cases_total"] == 6
    seen_progress = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/testsets/phantoms/rescore/{job['job_id']}", headers=auth("organizer")).json()
        seen_progress.add(job["n_cases_done"])
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.3)
    assert job["state"] == "done", (job, stack.logs())
    assert job["n_cases_done"] == 6 and job["n_scores_written"] == 6 * 9
    assert client.get(f"/api/v1/testsets/phantoms/rescore/{job['job_id']}", headers=auth("analyst")).status_code == 403

    # no container was started by the re-scoring
    assert _touchstone_containers(docker_client, stack) == before
    assert stack.containers(docker_client, submission_id) == []

    # both versions readable; the default is the test set's current one
    boards = {}
    for protocol_key in (None, "touchstone@1", "touchstone@2"):
        params = {"scope": "all", "metric": "nsd"} | ({"protocol": protocol_key} if protocol_key else {})
        answer = client.get("/api/v1/leaderboards/phantoms", params=params, headers=auth("organizer"))
        assert answer.status_code == 200, answer.text
        boards[protocol_key] = answer.json()
    assert boards[None]["protocol_key"] == boards["touchstone@1"]["protocol_key"] == "touchstone@1"
    assert boards["touchstone@2"]["protocol_key"] == "touchstone@2"
    nsd = {k: [e["mean"] for e in b["entries"]] for k, b in boards.items()}
    assert len(nsd["touchstone@2"]) == 1 and nsd[None] == nsd["touchstone@1"]
    # a wider tolerance: a surface point counts as often or more
    assert nsd["touchstone@2"][0] > nsd["touchstone@1"][0]
    dsc = [client.get("/api/v1/leaderboards/phantoms", params={"scope": "all", "protocol": k},
                      headers=auth("organizer")).json()["entries"][0]["mean"] for k in ("touchstone@1", "touchstone@2")]
    assert dsc[0] == pytest.approx(dsc[1], abs=1e-12)  # DSC does not depend on the tolerance
    cases = client.get(f"/api/v1/leaderboards/phantoms/submissions/{submission_id}/cases",
                       params={"protocol": "touchstone@2"}, headers=auth("organizer")).json()
    assert cases["protocol_key"] == "touchstone@2" and cases["total"] == 7 * 9 - 9  # hidden cases only
    unknown = client.get("/api/v1/leaderboards/phantoms", params={"protocol": "touchstone@9"})
    assert unknown.status_code == 404 and "touchstone@1, touchstone@2" in unknown.json()["detail"]
    versions = client.get("/api/v1/testsets/phantoms/protocols").json()
    assert [(v["protocol_key"], v["current"]) for v in versions] == [("touchstone@1", True), ("touchstone@2", False)]
    export = client.get("/api/v1/exports/phantoms", params={"scope": "all", "protocol": "touchstone@2"},
                        headers=auth("organizer"))
    assert export.status_code == 200 and export.headers["x-touchstone-protocol"] == "touchstone@2"
    assert "touchstone@2" in export.text.splitlines()[1]
