"""Misbehaving example: tries to reach the network and reports what happened.

Exits 42 if any attempt succeeded (the sandbox would be broken), else 0 after writing nothing.
"""
import json
import os
import socket

attempts = {}
for name, address in {"dns-1.1.1.1:53": ("1.1.1.1", 53), "https-8.8.8.8:443": ("8.8.8.8", 443),
                      "docker-host-172.17.0.1:2375": ("172.17.0.1", 2375)}.items():
    try:
        socket.create_connection(address, timeout=2).close()
        attempts[name] = "connected"
    except OSError as exc:
        attempts[name] = f"unreachable: {exc}"
try:
    socket.getaddrinfo("pypi.org", 443)
    attempts["resolve pypi.org"] = "resolved"
except OSError as exc:
    attempts["resolve pypi.org"] = f"unreachable: {exc}"
interfaces = sorted(os.listdir("/sys/class/net"))
print(json.dumps({"network_report": attempts, "interfaces": interfaces}), flush=True)
raise SystemExit(42 if any(not v.startswith("unreachable") for v in attempts.values()) else 0)
