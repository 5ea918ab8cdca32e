"""Misbehaving example: reads the inputs, exits 0 and writes nothing."""
import json

cases = json.load(open("/input/cases.json"))["cases"]
print(f"saw {len(cases)} case(s); writing nothing")
