#!/usr/bin/env bash
# Starts containerd and dockerd (if they are not running) detached from the caller's session --
# setsid + nohup, stdin from /dev/null -- so a Ctrl-C to `touchstone demo` or a test runner never
# reaches them; waits until `docker info` answers (at most 60 s). Used by scripts/setup.sh and by
# the engine-restart test. Run as root.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
if command -v containerd >/dev/null && ! pgrep -x containerd >/dev/null; then
  setsid nohup containerd </dev/null >>/var/log/containerd.log 2>&1 &
fi
if ! pgrep -x dockerd >/dev/null; then
  rm -f /var/run/docker.pid
  setsid nohup dockerd </dev/null >>/var/log/dockerd.log 2>&1 &
fi
for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && exit 0; sleep 0.5; done
echo "[setup] dockerd did not start; see /var/log/dockerd.log" >&2
tail -20 /var/log/dockerd.log >&2
exit 1
