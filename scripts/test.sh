#!/usr/bin/env bash
# Set up from scratch if needed, then run the whole test suite (real codex end-to-end tests
# included: they use the pinned codex installed into node_modules/).
set -euo pipefail
cd "$(dirname "$0")/.."
CODEX_BROKER_INSTALL_CODEX=1 scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
