"""The worked Sessions of docs/CLIENTS.md, run against a real broker: grpc-js (node, with the
packages scripts/setup.sh installs into docs/examples/grpcjs) and Python."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from harness import ROOT

GRPCJS = ROOT / "docs" / "examples" / "grpcjs"
BIG = 6_000_000  # over the 4 MiB a gRPC client receives by default


def run_example(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def grpcjs(b, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    installed = (GRPCJS / "node_modules" / "@grpc" / "grpc-js").is_dir()
    assert installed, "run scripts/setup.sh (npm ci in docs/examples/grpcjs)"
    return run_example(["node", str(GRPCJS / "session.js"), b.endpoint, *args], env)


def printed(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_grpcjs_example_runs_a_turn_and_receives_a_result_larger_than_4_mib(broker):
    b = broker()
    result = grpcjs(b, "deltas=3", "fake/big", json.dumps({"bytes": BIG}))
    assert result.returncode == 0, result.stderr
    messages = printed(result.stdout)
    deltas = [m["params"]["delta"] for m in messages if m.get("method") == "item/agentMessage/delta"]
    assert deltas == ["w0 ", "w1 ", "w2 "]
    assert any(m.get("method") == "turn/completed" for m in messages)
    assert messages[-1]["bytes"] > BIG
    assert "session ended: OK" in result.stderr


def test_grpcjs_with_its_default_receive_limit_loses_the_session_to_one_large_result(broker):
    b = broker()
    result = grpcjs(b, "deltas=1", "fake/big", json.dumps({"bytes": BIG}), env={"EXAMPLE_DEFAULT_LIMITS": "1"})
    assert result.returncode == 1
    assert "session ended: RESOURCE_EXHAUSTED" in result.stderr, result.stderr


def test_python_example_runs_a_turn(broker):
    b = broker()
    result = run_example([sys.executable, str(ROOT / "docs" / "examples" / "python" / "session.py"), b.endpoint,
                          "deltas=2"], env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    messages = printed(result.stdout)
    assert [m["params"]["delta"] for m in messages if m.get("method") == "item/agentMessage/delta"] == ["w0 ", "w1 "]
    assert "session ended: OK" in result.stderr
