"""Misbehaving example: forks without end. The pids limit must stop it; it then reports how many
processes it reached and keeps trying (until the time limit kills the container)."""
import os
import time

children = 0
refused = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        refused += 1
        if refused == 1:
            print(f"fork refused after {children} children: {exc}", flush=True)
        time.sleep(0.01)
        continue
    if pid == 0:  # a child: sleep, so the processes pile up
        while True:
            time.sleep(3600)
    children += 1
