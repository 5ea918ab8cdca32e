#!/usr/bin/env bash
# Builds the images of docker-compose.yml on a machine without a container registry:
#   touchstone/stack-base:bookworm  Debian rootfs (mmdebstrap, the host's apt sources) with python3,
#                                   postgresql and redis-server
#   touchstone/app:latest           ./Dockerfile FROM stack-base, Python deps from a host wheelhouse
#   touchstone/postgres:local       docker/postgres FROM stack-base
#   touchstone/redis:local          docker/redis FROM stack-base
# and prints the environment to use them:  eval "$(scripts/build-stack-images.sh)".
# With a registry, just `docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t touchstone/app .`
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[stack-images] %s\n' "$*" >&2; }
STACK_BASE="${STACK_BASE:-touchstone/stack-base:bookworm}"
if ! docker image inspect "$STACK_BASE" >/dev/null 2>&1; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  log "building $STACK_BASE with mmdebstrap"
  mmdebstrap --quiet --variant=apt \
    --include=python3,python3-venv,ca-certificates,postgresql,redis-server \
    bookworm "$tmp/rootfs.tar"
  docker import "$tmp/rootfs.tar" "$STACK_BASE" >/dev/null
fi
PY=".venv/bin/python"; [ -x "$PY" ] || PY=python3
# The dependencies' wheels are cached until pyproject.toml changes (its hash is kept in the
# wheelhouse); Touchstone's own wheel is rebuilt every time, so the image has the current code.
PYPROJECT_SHA="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat build/wheelhouse/.pyproject.sha256 2>/dev/null)" != "$PYPROJECT_SHA" ]; then
  log "building the wheelhouse of the dependencies (build/wheelhouse; a few minutes the first time)"
  rm -rf build/wheelhouse; mkdir -p build/wheelhouse
  "$PY" -m pip wheel -q --wheel-dir build/wheelhouse '.[prod]' >&2
  # The image's python (Debian's 3.11.2) may differ from the host's: environment markers such as
  # `python_full_version < "3.11.3"` then want wheels the host's pip skipped. pip evaluates markers
  # with the interpreter it runs on, so let the image's own python add what it is missing (the
  # host's CA bundle goes along for sites whose proxy re-signs TLS).
  log "adding the wheels the python of $STACK_BASE needs"
  WHEEL="$(basename "$(ls build/wheelhouse/touchstone-*.whl | head -1)")"
  CA=(); [ -f /etc/ssl/certs/ca-certificates.crt ] && CA=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro -e PIP_CERT=/host-ca.crt)
  docker run --rm "${CA[@]}" -v "$PWD/build/wheelhouse:/wheelhouse" "$STACK_BASE" sh -c \
    "python3 -m venv /tmp/venv && /tmp/venv/bin/pip download -q --disable-pip-version-check --only-binary=:all: \
       --dest /wheelhouse --find-links /wheelhouse 'touchstone[prod] @ file:///wheelhouse/$WHEEL'" >&2
  echo "$PYPROJECT_SHA" > build/wheelhouse/.pyproject.sha256
fi
log "building the touchstone wheel"
rm -f build/wheelhouse/touchstone-*.whl
rm -rf build/lib build/bdist.* ./*.egg-info
"$PY" -m pip wheel -q --no-deps --wheel-dir build/wheelhouse . >&2
log "building touchstone/app:latest"
docker build -q --build-arg BASE_IMAGE="$STACK_BASE" -t touchstone/app:latest . >&2
log "building touchstone/postgres:local and touchstone/redis:local"
docker build -q --build-arg BASE_IMAGE="$STACK_BASE" -t touchstone/postgres:local docker/postgres >&2
docker build -q --build-arg BASE_IMAGE="$STACK_BASE" -t touchstone/redis:local docker/redis >&2
echo "export APP_IMAGE=touchstone/app:latest POSTGRES_IMAGE=touchstone/postgres:local REDIS_IMAGE=touchstone/redis:local"
