#!/usr/bin/env bash
# The README's test command. On a fresh Debian 12 machine as root it installs and starts everything
# the suite needs (Docker engine, Redis, PostgreSQL, chromium, the venv, the base image), then runs
# pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# Nothing that CI can run may be skipped: a missing engine/server fails the test instead.
export TOUCHSTONE_REQUIRE_ALL=1
exec .venv/bin/python -m pytest "$@"
