#!/usr/bin/env bash
# Fills a wheelhouse for images that need PyTorch + MONAI (examples/algorithms/monai-segresnet),
# so that `docker build` installs from local files and never downloads torch:
#
#   scripts/build-wheelhouse.sh [DIR]        # default build/monai-wheelhouse (git-ignored)
#
# - torch: the local CPU wheel (TOUCHSTONE_TORCH_WHEEL, else /opt/wheels, else the one pip finds
#   through its find-links / cache with `pip download torch==$TORCH_VERSION --no-deps`);
# - monai and torch's pure-Python dependencies: `pip download --no-deps` at the versions of this
#   checkout's .venv (so the image runs what the tests ran), for CPython 3.11 (the base image's);
# - numpy and nibabel are NOT included: the base image's Debian packages provide them.
# Idempotent: files already there are kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/build/monai-wheelhouse}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
mkdir -p "$DIR"

if ! ls "$DIR"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
  wheel="${TOUCHSTONE_TORCH_WHEEL:-}"
  [ -n "$wheel" ] || wheel="$(ls /opt/wheels/torch-"$TORCH_VERSION"+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)"
  if [ -n "$wheel" ]; then
    cp "$wheel" "$DIR/"
  else
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 -d "$DIR" "torch==$TORCH_VERSION"
  fi
  echo "[wheelhouse] torch: $(ls "$DIR"/torch-*.whl)" >&2
fi
case "$(ls "$DIR"/torch-*.whl)" in *+cpu*) ;; *) echo "[wheelhouse] warning: torch wheel is not a +cpu build (large)" >&2 ;; esac

# name==version from .venv where installed (reproducible), else unpinned
specs="$("$PY" - <<'PYEOF'
import importlib.metadata as m
for name in ("monai", "filelock", "typing_extensions", "setuptools", "sympy", "mpmath", "networkx",
             "jinja2", "MarkupSafe", "fsspec"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        print(name)
PYEOF
)"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$DIR" $specs
echo "[wheelhouse] $DIR: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1)" >&2
