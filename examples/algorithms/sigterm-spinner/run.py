"""Misbehaving example: ignores SIGTERM (and SIGINT, SIGHUP) and spins the CPU forever, in two
processes. Only SIGKILL stops it: the time limit must still end the run."""
import os
import signal

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
os.fork()  # the child inherits the ignored signals
print(f"spinning in pid {os.getpid()}, ignoring SIGTERM", flush=True)
n = 0
while True:
    n += 1
