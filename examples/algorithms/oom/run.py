"""Misbehaving example: allocates (and touches) 64 MiB blocks until the memory limit kills it."""
blocks = []
while True:
    blocks.append(b"\xff" * (64 << 20))  # bytes(...) would not touch the pages; this does
    print(f"allocated {len(blocks) * 64} MiB", flush=True)
