#!/usr/bin/env bash
# The README's first command: from a fresh Debian 12 machine (as root) to a populated leaderboard.
#
#   bash scripts/demo.sh [--data-dir DIR] [--cases N] [--port P] [--no-serve]
#
# Installs and starts what is missing (Debian packages, the Docker engine, the virtual environment,
# the local base image: scripts/setup.sh), builds the example algorithm images the demo submits,
# then runs `touchstone demo` with the arguments given (see `touchstone demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
bash scripts/build-examples.sh "$TOUCHSTONE_BASE_IMAGE" --only classical,trivial,garbage
exec .venv/bin/touchstone demo "$@"
