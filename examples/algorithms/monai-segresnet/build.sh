#!/usr/bin/env bash
# Builds this example as an image (default tag touchstone/example-monai-segresnet:latest):
#
#   examples/algorithms/monai-segresnet/build.sh [BASE_IMAGE] [TAG]
#
# 1. scripts/build-wheelhouse.sh fills build/monai-wheelhouse/ (local torch CPU wheel + monai);
# 2. the build context build/monai-segresnet-context/ gets Dockerfile, predict.py, segresnet.pt and
#    wheels/ (hard links where possible);
# 3. docker build --build-arg BASE_IMAGE=... (the layer cache makes a rebuild take seconds).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
BASE="${1:-${TOUCHSTONE_BASE_IMAGE:-touchstone/base:bookworm}}"
TAG="${2:-touchstone/example-monai-segresnet:latest}"
WHEELS="${TOUCHSTONE_WHEELHOUSE:-$ROOT/build/monai-wheelhouse}"
CONTEXT="$ROOT/build/monai-segresnet-context"
[ -f "$HERE/segresnet.pt" ] || { echo "[monai-segresnet] no segresnet.pt: run train.py first" >&2; exit 1; }
bash "$ROOT/scripts/build-wheelhouse.sh" "$WHEELS" 2> >(grep -v "is ignored: it is neither" >&2)
rm -rf "$CONTEXT"; mkdir -p "$CONTEXT/wheels"
cp "$HERE/Dockerfile" "$HERE/predict.py" "$HERE/segresnet.pt" "$CONTEXT/"
for wheel in "$WHEELS"/*.whl; do
  ln "$wheel" "$CONTEXT/wheels/" 2>/dev/null || cp "$wheel" "$CONTEXT/wheels/"
done
echo "[monai-segresnet] building $TAG from $BASE" >&2
docker build -q --build-arg "BASE_IMAGE=$BASE" -t "$TAG" "$CONTEXT" >/dev/null
echo "[monai-segresnet] built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
