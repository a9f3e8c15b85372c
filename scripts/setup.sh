#!/usr/bin/env bash
# Sets up a fresh checkout: a virtualenv in .venv with the project and its dev dependencies,
# and the pinned codex CLI installed locally (node_modules/) when `codex` is not on PATH or
# when CODEX_BROKER_INSTALL_CODEX=1, and the grpc-js example's packages (docs/examples/grpcjs).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

CODEX_VERSION=0.169.0
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c 'import grpc, grpc_tools, psutil, pytest, lifecycle, proxy, protos' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing the project and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev,bench]'
  touch .venv/.installed
fi

# Bytecode for the project's own modules, as a wheel install writes it: a broker does not compile
# them at every start (~30 ms of it) where the environment keeps Python from caching bytecode.
.venv/bin/python -m compileall -q proxy lifecycle protos >/dev/null

# The grpc-js example of docs/CLIENTS.md (run by tests/test_client_examples.py), pinned by its lock file.
if [ ! -d docs/examples/grpcjs/node_modules/@grpc/grpc-js ] \
   || [ docs/examples/grpcjs/package-lock.json -nt docs/examples/grpcjs/node_modules/.package-lock.json ]; then
  echo "setup: installing the grpc-js example's packages into docs/examples/grpcjs/node_modules" >&2
  npm ci --prefix docs/examples/grpcjs --no-audit --no-fund --loglevel=error >&2
fi

want_codex=${CODEX_BROKER_INSTALL_CODEX:-}
if [ -z "$want_codex" ] && ! command -v codex >/dev/null 2>&1; then
  want_codex=1
fi
if [ "$want_codex" = 1 ]; then
  if [ "$(node_modules/.bin/codex --version 2>/dev/null || true)" != "codex-cli $CODEX_VERSION" ]; then
    echo "setup: installing @openai/codex@$CODEX_VERSION locally into node_modules/ (about 400 MB)" >&2
    npm install --no-save --no-audit --no-fund --loglevel=error "@openai/codex@$CODEX_VERSION" >&2
  fi
fi
