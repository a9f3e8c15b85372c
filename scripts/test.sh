#!/usr/bin/env bash
# Set up from scratch if needed, check the code with ruff and mypy, then run the whole test
# suite (real codex end-to-end tests included: they use the pinned codex installed into
# node_modules/). Arguments go to pytest; CODEX_BROKER_SKIP_LINT=1 skips ruff and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
CODEX_BROKER_INSTALL_CODEX=1 scripts/setup.sh
if [ -z "${CODEX_BROKER_SKIP_LINT:-}" ]; then
  echo "test: ruff check ." >&2
  .venv/bin/ruff check .
  echo "test: mypy (proxy, lifecycle, protos, bench)" >&2
  .venv/bin/mypy
fi
exec .venv/bin/python -m pytest "$@"
