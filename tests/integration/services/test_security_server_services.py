"""Against a real uvicorn process: an anonymous 200 MB JSON body (Content-Length and chunked) is
answered 413 without the server's memory growing; security headers on every kind of response;
/metrics closed to anonymous callers; an id past the column's range is a 422, not a 500."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest

MIB = 1024**2
BODY_MIB = 200


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _big_post(base: str, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    """POST /api/v1/teams (anonymous) with a 200 MB JSON body, sent over a raw socket."""
    url = urlparse(base)
    sock = socket.create_connection((url.hostname, url.port))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY_MIB * MIB}"
    sock.sendall((f"POST /api/v1/teams HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                  f"{framing}\r\n\r\n").encode())
    block = b'{"name": "' + b"x" * (MIB - 20) + b'",'  # ~1 MiB of JSON-looking text
    result: dict = {}

    def reader() -> None:
        try:
            result["response"] = _read_response(sock, timeout=60)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(BODY_MIB):
            if "response" in result or "error" in result:
                break
            sock.sendall((f"{len(block):x}\r\n".encode() + block + b"\r\n") if chunked else block)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed the connection: expected
    thread.join(timeout=60)
    sock.close()
    assert "response" in result, f"no answer from the server: {result.get('error')}"
    return result["response"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_200_mb_anonymous_body_is_refused_without_memory_growth(live_server, chunked):
    base, process = live_server
    for _ in range(3):  # warm up: imports, first requests
        httpx.post(f"{base}/api/v1/teams", json={"name": "warm"}, timeout=10)
    time.sleep(0.5)
    before = _rss(process.pid)
    status, headers, body = _big_post(base, chunked)
    time.sleep(0.5)
    after = _rss(process.pid)
    print(f"server RSS before {before / MIB:.1f} MiB, after {after / MIB:.1f} MiB "
          f"({'chunked' if chunked else 'content-length'}), growth {(after - before) / MIB:.2f} MiB")
    assert status == 413
    detail = json.loads(body)["detail"]
    assert "1048576 bytes" in detail and "TOUCHSTONE_MAX_REQUEST_BODY_BYTES" in detail
    assert headers["x-content-type-options"] == "nosniff"
    assert after - before < 10 * MIB, f"RSS grew by {(after - before) / MIB:.1f} MiB"
    # the server still serves
    assert httpx.get(f"{base}/api/v1/health", timeout=10).status_code == 200


def test_security_headers_on_every_kind_of_response(live_server, world):
    base, _ = live_server
    org = world["headers"]["org"]
    responses = {
        "json": httpx.get(f"{base}/api/v1/health"),
        "html page": httpx.get(f"{base}/leaderboards"),
        "static": httpx.get(f"{base}/static/style.css"),
        "404": httpx.get(f"{base}/api/v1/nothing-here"),
        "405": httpx.delete(f"{base}/api/v1/health"),
        "413": httpx.post(f"{base}/api/v1/teams", content=b"x" * (2 * MIB), headers={"content-type": "application/json"}),
        "422": httpx.post(f"{base}/api/v1/teams", json={"name": ""}, headers=org),
        "401": httpx.get(f"{base}/api/v1/users"),
        "docs": httpx.get(f"{base}/docs"),
        "openapi": httpx.get(f"{base}/api/v1/openapi.json"),
    }
    expected_status = {"json": 200, "html page": 200, "static": 200, "404": 404, "405": 405, "413": 413,
                       "422": 422, "401": 401, "docs": 200, "openapi": 200}
    for kind, response in responses.items():
        assert response.status_code == expected_status[kind], (kind, response.text[:300])
        assert response.headers["x-content-type-options"] == "nosniff", kind
        assert response.headers["x-frame-options"] == "DENY", kind
        assert response.headers["referrer-policy"] == "no-referrer", kind
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], kind
        if response.headers["content-type"].startswith("application/json") and kind not in ("json", "openapi"):
            assert isinstance(response.json()["detail"], str), kind
    # the pages' one inline script is allowed by its hash, nothing else inline
    page_csp = responses["html page"].headers["content-security-policy"]
    assert "'sha256-" in page_csp and "script-src 'self' 'sha256-" in page_csp
    # /docs loads Swagger UI from its CDN
    assert "https://cdn.jsdelivr.net" in responses["docs"].headers["content-security-policy"]
    assert "https://cdn.jsdelivr.net" not in page_csp


def test_tokens_are_not_cached_and_metrics_are_for_organizers(live_server, world):
    base, _ = live_server
    h = world["headers"]
    created = httpx.post(f"{base}/api/v1/users", headers=h["org"], json={"name": "newbie", "role": "analyst"})
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    user_id = created.json()["user"]["id"]
    token = httpx.post(f"{base}/api/v1/users/{user_id}/tokens", headers=h["org"], json={"label": "x"})
    assert token.status_code == 201 and token.headers["cache-control"] == "no-store"
    assert httpx.get(f"{base}/metrics").status_code == 401
    assert httpx.get(f"{base}/metrics", headers=h["inv_a"]).status_code == 403
    scrape = httpx.get(f"{base}/metrics", headers=h["org"])
    assert scrape.status_code == 200 and 'touchstone_team_storage_bytes{team="team-a"}' in scrape.text


@pytest.mark.parametrize("path", [
    "/api/v1/leaderboards/ts1/submissions/9223372036854775808",
    "/api/v1/leaderboards/ts1/submissions/2147483648/cases",
    "/api/v1/submissions/99999999999999999999999",
    "/api/v1/submissions?offset=9223372036854775808",
    "/api/v1/testsets/ts1/cases?limit=10001",
    "/api/v1/testsets/ts%00/cases",
])
def test_out_of_range_and_nul_inputs_are_422(live_server, world, path):
    base, _ = live_server
    response = httpx.get(f"{base}{path}", headers=world["headers"]["org"])
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["detail"], str)
