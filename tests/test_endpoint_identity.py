"""`stop --force` and `drain --wait` on an `--endpoint` signal and wait only on a proven broker.

A pid that Status reports proves nothing: any server can answer with any pid. The lying server
here is a small gRPC server inside the test process that implements Broker.Status with the pid of
an unrelated process (a `sleep` of ours) and Broker.Drain (so the old code went on to wait and
kill). On a unix socket the kernel's peer credentials name the test process as the listener, on
TCP the `sleep`'s command line is no serve argv: both are refused, with one line, exit 1, the
`sleep` untouched and (for drain --wait) no Drain sent. Real brokers are stopped through their
endpoints, unix and TCP (started with --instance-id); a TCP broker started without one cannot be
proven and is refused."""
from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from lifecycle_support import CLI, World, process, wait_exit, world_for

from lifecycle.client import BrokerClient
from protos import broker_pb2, broker_pb2_grpc


class LyingBroker(broker_pb2_grpc.BrokerServicer):
    """Answers Status with someone else's pid; counts the Drains it was asked for."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.drains = 0

    def Status(self, request: broker_pb2.StatusRequest, context: grpc.ServicerContext) -> broker_pb2.BrokerStatus:
        return broker_pb2.BrokerStatus(instance_id="liar", pid=self.pid, state=broker_pb2.BROKER_STATE_SERVING)

    def Drain(self, request: broker_pb2.DrainRequest, context: grpc.ServicerContext) -> broker_pb2.DrainReply:
        self.drains += 1
        return broker_pb2.DrainReply(state=broker_pb2.BROKER_STATE_DRAINING)


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def lying_server(kind: str, pid: int) -> Iterator[tuple[str, LyingBroker]]:
    servicer = LyingBroker(pid)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    with tempfile.TemporaryDirectory(prefix="cxl", dir="/tmp") as base:
        if kind == "unix":
            endpoint = f"unix:{base}/s.sock"
            server.add_insecure_port(endpoint)
        else:
            endpoint = f"tcp:127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        try:
            yield endpoint, servicer
        finally:
            server.stop(None).wait(10)


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_stop_force_on_an_endpoint_answering_another_process_pid_signals_nothing(
        kind: str, victim: subprocess.Popen[bytes]) -> None:
    with lying_server(kind, victim.pid) as (endpoint, servicer):
        result = cli("stop", "--force", "--endpoint", endpoint)

        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"codex-broker stop: refusing to signal or wait on pid "
                                                        f"{victim.pid}: "), result.stderr
        assert servicer.drains == 0
    assert victim.poll() is None, "the process the endpoint named was signalled"


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_drain_wait_on_an_endpoint_answering_another_process_pid_refuses_at_once(
        kind: str, victim: subprocess.Popen[bytes]) -> None:
    with lying_server(kind, victim.pid) as (endpoint, servicer):
        result = cli("drain", "--wait", "--endpoint", endpoint, timeout=60)  # the old code waited forever

        assert result.returncode == 1, result
        assert "refusing to signal or wait on pid" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert servicer.drains == 0, "a broker whose identity failed was asked to drain"
    assert victim.poll() is None


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def test_stop_force_and_drain_wait_by_unix_endpoint_stop_a_real_broker(world: World, tmp_path: Path) -> None:
    first = world.ensure()
    proc = process(first.pid)
    out = world.cli("stop", "--force", "--endpoint", first.endpoint)
    assert out.returncode == 0, out
    assert out.stdout.strip().endswith(f"broker pid {first.pid} stopped")
    assert wait_exit(proc, 0.5)

    other = tmp_path / "ws2"
    other.mkdir()
    second = world.ensure(workspace=other)
    proc = process(second.pid)
    out = world.cli("drain", "--wait", "--endpoint", second.endpoint)
    assert out.returncode == 0, out
    assert f"broker pid {second.pid} exited" in out.stdout
    assert wait_exit(proc, 0.5)


@contextlib.contextmanager
def tcp_broker(world: World, tmp_path: Path, *flags: str) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """A broker on 127.0.0.1 (a free port); yields (endpoint, token file, process)."""
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(24) + "\n")
    token.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--endpoint", "tcp:127.0.0.1:0", "--token-file", str(token),
         "--app-server", world.fake_command(), *flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = None
        assert proc.stderr is not None
        for line in proc.stderr:
            if " ready endpoint=" in line:
                endpoint = line.split(" ready endpoint=", 1)[1].split()[0]
                break
        assert endpoint, "the TCP broker never said where it listens"
        yield endpoint, str(token), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_stop_by_tcp_endpoint_needs_a_broker_started_with_its_instance_id(world: World, tmp_path: Path) -> None:
    with tcp_broker(world, tmp_path) as (endpoint, token, proc):
        refused = world.cli("stop", "--force", "--endpoint", endpoint, "--token-file", token)
        assert refused.returncode == 1, refused
        assert "--instance-id" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert proc.poll() is None
        with BrokerClient(endpoint) as client:
            assert client.health() == "SERVING"

    with tcp_broker(world, tmp_path, "--instance-id", "tcp-broker-1") as (endpoint, token, proc):
        stopped = world.cli("stop", "--force", "--endpoint", endpoint, "--token-file", token)
        assert stopped.returncode == 0, stopped
        assert stopped.stdout.strip().endswith(f"broker pid {proc.pid} stopped")
        assert proc.wait(timeout=10) == 0


def test_stop_force_kills_a_recorded_broker_that_does_not_answer_by_its_proven_record(world: World) -> None:
    broker = world.ensure()
    proc = process(broker.pid)
    proc.suspend()  # Status cannot answer; the kernel still names it as its socket's listener

    result = world.cli("stop", "--force")

    assert result.returncode == 0, result
    assert result.stdout.strip().endswith(f"broker pid {broker.pid} stopped")
    assert wait_exit(proc, 10)
    assert world.record() is None
