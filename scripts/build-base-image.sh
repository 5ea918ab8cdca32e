#!/usr/bin/env bash
# Builds the base image that the example algorithm images start FROM, offline: mmdebstrap makes a
# Debian bookworm root filesystem from this machine's own apt sources, `docker import` turns it into
# an image. Where a registry is reachable, set BASE_IMAGE (e.g. python:3.11-slim) instead and skip this.
set -euo pipefail
NAME="${1:-touchstone/base:bookworm}"
if [ -n "${BASE_IMAGE:-}" ]; then
  echo "[base-image] BASE_IMAGE=$BASE_IMAGE given; not building $NAME" >&2; exit 0
fi
if docker image inspect "$NAME" >/dev/null 2>&1; then exit 0; fi
command -v mmdebstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq mmdebstrap >/dev/null; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
echo "[base-image] building $NAME with mmdebstrap (about a minute)" >&2
mmdebstrap --quiet --variant=apt \
  --include=python3-minimal,python3-numpy,python3-scipy,python3-nibabel \
  bookworm "$tmp/base.tar"
docker import --change 'CMD ["python3"]' "$tmp/base.tar" "$NAME" >/dev/null
echo "[base-image] built $NAME" >&2
