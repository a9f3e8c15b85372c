"""TCP is opt-in: a token file is required, loopback unless allowed, and every RPC but Health
needs the bearer token (grpc_health_probe and Kubernetes gRPC probes need no secret)."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import error_lines, fake_command, new_marker, processes_with, run_serve, wait_gone

from lifecycle.client import BrokerClient
from lifecycle.errors import RpcFailed
from protos import broker_pb2, broker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[str, str]:
    token = secrets.token_urlsafe(24)
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path), token


@pytest.fixture
def tcp_broker(token_file: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """A broker on 127.0.0.1 with a port of its choosing; yields (endpoint, token)."""
    marker = new_marker()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--endpoint", "tcp:127.0.0.1:0", "--token-file", token_file[0],
         "--app-server", fake_command(marker=marker)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    endpoint = None
    assert proc.stderr is not None
    for line in proc.stderr:  # the ready line names the port that was bound
        if " ready endpoint=" in line:
            endpoint = line.split(" ready endpoint=", 1)[1].split()[0]
            break
    assert endpoint and endpoint.startswith("tcp:127.0.0.1:") and not endpoint.endswith(":0"), endpoint
    try:
        yield endpoint, token_file[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()
        assert not wait_gone(processes_with(marker), 10)


def test_tcp_health_needs_no_token_and_everything_else_does(tcp_broker):
    endpoint, token = tcp_broker
    target = endpoint.removeprefix("tcp:")
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        app = broker_pb2_grpc.AppServerStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong-token-wrong-token"),),
                         (("authorization", token),)):
            with pytest.raises(grpc.RpcError) as refused:
                app.Call(broker_pb2.CallRequest(method="thread/loaded/list"), timeout=10, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            list(app.Session(iter([broker_pb2.ClientFrame(message="{}")]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tcp_client_with_the_token_gets_calls_sessions_and_status(tcp_broker):
    endpoint, token = tcp_broker
    with BrokerClient(endpoint, token=token) as client:
        assert client.health() == "SERVING"
        assert client.call("thread/loaded/list") == {"data": [], "nextCursor": None}
        assert client.status().endpoint == endpoint
        with client.session() as session:
            thread = session.request("thread/start", {})["thread"]["id"]
            turn = session.request("turn/start", {"threadId": thread, "input": [{"type": "text", "text": "deltas=3"}]})
            assert session.follow_turn(thread, turn["turn"]["id"], timeout=30)["status"] == "completed"
    with BrokerClient(endpoint) as client, pytest.raises(RpcFailed, match="UNAUTHENTICATED"):
        client.status()


def test_cli_status_over_tcp_uses_the_token_file(tcp_broker, token_file):
    endpoint, _ = tcp_broker
    cli = [sys.executable, "-m", "lifecycle.cli"]
    ok = subprocess.run([*cli, "status", "--endpoint", endpoint, "--token-file", token_file[0], "--json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert endpoint in ok.stdout
    refused = subprocess.run([*cli, "status", "--endpoint", endpoint], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 3 and "UNAUTHENTICATED" in refused.stderr, refused.stderr  # an RPC failure


@pytest.mark.parametrize("case", ["no-token-file", "not-loopback", "unsafe-token-file", "short-token"])
def test_tcp_is_refused_without_a_safe_token_or_off_loopback(case, tmp_path, token_file):
    path = token_file[0]
    args = ["--endpoint", "tcp:127.0.0.1:0", "--token-file", path]
    if case == "no-token-file":
        args = ["--endpoint", "tcp:127.0.0.1:0"]
    elif case == "not-loopback":
        args = ["--endpoint", "tcp:0.0.0.0:0", "--token-file", path]
    elif case == "unsafe-token-file":
        os.chmod(path, 0o644)
    else:
        Path(path).write_text("short\n")
    marker = new_marker()
    result = run_serve(*args, "--app-server", fake_command(marker=marker))
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and ("token" in lines[0] or "--allow-remote" in lines[0]), result.stderr
    assert not processes_with(marker)
