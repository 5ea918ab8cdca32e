"""``touchstone submit`` / ``touchstone status`` with ``--format json``: one JSON document on stdout
that a script can parse -- the API's answer, or ``{"error": {...}}`` with exit status 1 -- for a
refusal, an unknown submission, an unreachable API and a missing token. The API is an
``httpx.MockTransport`` answering as the real one does (``{"detail": ...}``); the same commands
against a live server are tested in tests/integration/services/test_cli_core_services.py."""

from __future__ import annotations

import json

import httpx
import pytest
import typer
from typer.testing import CliRunner

from services.cli.core import register

BASE = "http://api.test"
REAL_CLIENT = httpx.Client


def _answer(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/api/v1/submissions" and request.method == "POST":
        if request.url.params.get("algorithm") == "taken":
            return httpx.Response(409, json={"detail": "this image was already submitted as submission 3"})
        return httpx.Response(202, json={"id": 7, "state": "received"})
    if request.url.path == "/api/v1/submissions/7":
        return httpx.Response(200, json={"id": 7, "algorithm": "a", "team": "t", "testset": "ts", "state": "queued",
                                         "received_at": "2026-01-01T00:00:00Z", "failure_reason": None})
    return httpx.Response(404, json={"detail": "no submission 8"})


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Invoke ``touchstone <args>`` against the mock API; returns the result."""
    transport = httpx.MockTransport(_answer)
    monkeypatch.setattr(httpx, "Client", lambda **kw: REAL_CLIENT(transport=transport, **kw))
    monkeypatch.setattr(httpx, "get", lambda url, **kw: REAL_CLIENT(transport=transport).get(url, **kw))
    monkeypatch.delenv("TOUCHSTONE_TOKEN", raising=False)
    app = typer.Typer()
    register(app)

    def run(*args: str):
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})  # rich wraps nothing

    return run


def test_submit_prints_the_api_answer_or_a_json_error(cli):
    ok = cli("submit", "registry.example.org/a/b:1", "--algorithm", "a", "--testset", "ts", "--api", BASE,
             "--token", "t", "--format", "json")
    assert ok.exit_code == 0 and json.loads(ok.stdout) == {"id": 7, "state": "received"}
    refused = cli("submit", "registry.example.org/a/b:1", "--algorithm", "taken", "--testset", "ts", "--api", BASE,
                  "--token", "t", "--format", "json")
    assert refused.exit_code == 1
    assert json.loads(refused.stdout) == {"error": {
        "message": "submission refused (409): this image was already submitted as submission 3",
        "http_status": 409, "detail": "this image was already submitted as submission 3"}}
    no_token = cli("submit", "x:1", "--algorithm", "a", "--testset", "ts", "--api", BASE, "--format", "json")
    assert no_token.exit_code == 1
    assert json.loads(no_token.stdout)["error"] == {"message": "give --token or set TOUCHSTONE_TOKEN",
                                                    "http_status": None, "detail": None}
    # the text format is unchanged: a sentence for a person (on stderr for an error)
    text = cli("submit", "x:1", "--algorithm", "taken", "--testset", "ts", "--api", BASE, "--token", "t")
    assert text.exit_code == 1 and text.stdout == "" and "409" in text.stderr


def test_status_prints_the_api_answer_or_a_json_error(cli):
    ok = cli("status", "7", "--api", BASE, "--token", "t", "--format", "json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["state"] == "queued"
    assert json.loads(cli("status", "7", "--api", BASE, "--token", "t", "--json").stdout) == json.loads(ok.stdout)
    missing = cli("status", "8", "--api", BASE, "--token", "t", "--format", "json")
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)["error"] == {"message": "(404): no submission 8", "http_status": 404,
                                                   "detail": "no submission 8"}
    bad = cli("status", "7", "--api", BASE, "--token", "t", "--format", "yaml")
    assert bad.exit_code == 2 and "choose one of text, json" in " ".join(bad.stderr.split())


def test_an_unreachable_api_is_a_json_error(cli, monkeypatch):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    monkeypatch.setattr(httpx, "get", lambda url, **kw: REAL_CLIENT(transport=httpx.MockTransport(refuse)).get(url, **kw))
    down = cli("status", "7", "--api", BASE, "--token", "t", "--format", "json")
    assert down.exit_code == 1
    error = json.loads(down.stdout)["error"]
    assert error["message"].startswith(f"could not reach the API at {BASE}") and error["http_status"] is None
