"""Misbehaving example: never finishes (the time limit must kill it)."""
import time

print("sleeping forever", flush=True)
while True:
    time.sleep(3600)
