#!/usr/bin/env bash
# The main job: set up, start (or reuse) this workspace's broker in front of `codex app-server`,
# send one request through it, and show the broker's status.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${CODEX_BROKER_APP_SERVER:-}" ] && ! command -v codex >/dev/null 2>&1; then
  export CODEX_BROKER_APP_SERVER="$PWD/node_modules/.bin/codex app-server"
fi
set -x
.venv/bin/codex-broker ensure
.venv/bin/codex-broker call thread/loaded/list
.venv/bin/codex-broker status
