"""Misbehaving example: fails at once with exit code 1 and an error message."""
import sys

print("Traceback (most recent call last):\nRuntimeError: model weights not found at /weights/model.pt", file=sys.stderr)
sys.exit(1)
