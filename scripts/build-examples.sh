#!/usr/bin/env bash
# Builds every example algorithm in examples/algorithms/<name>/ as touchstone/example-<name>:latest.
#
#   scripts/build-examples.sh [BASE_IMAGE] [--save DIR] [--only name1,name2]
#
# BASE_IMAGE (default $TOUCHSTONE_BASE_IMAGE or touchstone/base:bookworm, built offline by
# scripts/build-base-image.sh) is passed as --build-arg BASE_IMAGE. With --save DIR each image is
# also written as DIR/<name>.tar by `docker save` (the file an inventor uploads).
# A folder with its own build.sh (monai-segresnet: PyTorch + MONAI from a wheelhouse, ~1.5 GB) is
# built only when --only names it, by that script: plain runs and the test fixtures skip it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${TOUCHSTONE_BASE_IMAGE:-touchstone/base:bookworm}"
SAVE_DIR=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --save) SAVE_DIR="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    -*) echo "[examples] unknown option $1" >&2; exit 2 ;;
    *) BASE="$1"; shift ;;
  esac
done
docker image inspect "$BASE" >/dev/null 2>&1 || {
  echo "[examples] base image $BASE is missing; build it with scripts/build-base-image.sh $BASE" >&2; exit 1; }
[ -n "$SAVE_DIR" ] && mkdir -p "$SAVE_DIR"
for dir in "$ROOT"/examples/algorithms/*/; do
  name="$(basename "$dir")"
  [ -f "$dir/Dockerfile" ] || continue
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  tag="touchstone/example-$name:latest"
  if [ -f "$dir/build.sh" ] && [ -z "$ONLY" ]; then
    echo "[examples] skipping $name (own build.sh; name it in --only)" >&2; continue
  fi
  echo "[examples] building $tag" >&2
  if [ -f "$dir/build.sh" ]; then
    bash "$dir/build.sh" "$BASE" "$tag"
  else
    docker build -q --build-arg "BASE_IMAGE=$BASE" -t "$tag" "$dir" >/dev/null
  fi
  if [ -n "$SAVE_DIR" ]; then
    docker save -o "$SAVE_DIR/$name.tar" "$tag"
    echo "[examples] saved $SAVE_DIR/$name.tar" >&2
  fi
done
