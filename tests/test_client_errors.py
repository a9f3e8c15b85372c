"""Client errors in one place, and a `status` that prints whatever Status it is sent.

Every gRPC status code the CLI can meet maps to the README's exit codes: UNAVAILABLE is "cannot
connect" (2); DEADLINE_EXCEEDED is a timeout (3); UNAUTHENTICATED, INTERNAL, RESOURCE_EXHAUSTED
and the rest are an RPC failure (3), never "cannot connect". `health` keeps grpc_health_probe's
two phases: cannot connect is 2, a Check that fails after connecting is 3. Each code is produced
by a real gRPC server on a real unix socket (a small one in this process that answers every
call with that code), or by a real TCP broker asked without its token."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lifecycle_support import CLI, FAKE, wait_until

from lifecycle.cli import format_status, status_dict
from lifecycle.client import BrokerClient
from lifecycle.errors import CallTimeout, ConnectError, HealthTimeout, RpcFailed
from protos import broker_pb2, broker_pb2_grpc

NOW = 1_800_000_000.0
HOSTILE_FLOATS = [math.inf, -math.inf, math.nan, 1e308, -1e308, -5.0, 0.0, 5e-324]


# -- format_status and status_dict never crash ------------------------------------------------
def _status(value: float, **strings: Any) -> broker_pb2.BrokerStatus:
    """A Status whose every float field is ``value``, with one Session and one turn."""
    return broker_pb2.BrokerStatus(
        pid=7, started_at=value, state=broker_pb2.BROKER_STATE_DRAINING, last_probe_at=value,
        last_probe_latency_ms=value, last_response_at=value, drain_deadline=value, idle_timeout_seconds=value,
        in_flight_turns=[broker_pb2.InFlightTurn(thread_id="t", turn_id="u", started_at=value)],
        sessions=[broker_pb2.SessionInfo(session_id="s", opened_at=value)], **strings)


@pytest.mark.parametrize("value", HOSTILE_FLOATS, ids=repr)
def test_format_status_prints_any_float_in_every_time_field(value: float) -> None:
    text = format_status(_status(value), now=NOW)

    rows = {line[:17].strip(): line[17:] for line in text.splitlines() if not line.startswith(" ")}
    assert rows["state"].startswith("DRAINING")
    if value:  # 0 means "not set" for these fields
        assert rows["drain"].startswith("-; deadline in ")
        assert rows["last probe"].endswith(" ago")
    if not math.isfinite(value):
        assert "up ?" in rows["pid"]
    assert "  turn u on thread t: running " in text and "  session s -: open " in text


@pytest.mark.parametrize("value", HOSTILE_FLOATS, ids=repr)
def test_format_status_against_a_hostile_now(value: float) -> None:
    assert format_status(_status(1000.0), now=value).startswith("state")


def test_format_status_of_an_empty_status_and_an_unknown_state_value() -> None:
    empty = format_status(broker_pb2.BrokerStatus(), now=NOW)
    assert "none needed yet" in empty and "none yet" in empty and "drain" not in empty
    unknown = broker_pb2.BrokerStatus()
    unknown.state = 99  # type: ignore[assignment]  # open enum: a newer broker's state
    assert format_status(unknown, now=NOW).startswith("state            UNKNOWN(99)")


def test_status_dict_of_non_finite_floats_is_printable_json() -> None:
    data = status_dict(_status(math.inf))
    text = json.dumps(data)
    assert json.loads(text)["drain_deadline"] == "Infinity"
    assert json.loads(json.dumps(status_dict(_status(math.nan))))["started_at"] == "NaN"


# -- a small real gRPC server that answers every call with one status code ----------------------
class _Refusing(broker_pb2_grpc.BrokerServicer, health_pb2_grpc.HealthServicer):
    def __init__(self, code: grpc.StatusCode | None, status: broker_pb2.BrokerStatus | None = None,
                 delay: float = 0.0):
        self.code, self.reply, self.delay = code, status, delay
        self.release = threading.Event()

    def _answer(self, context: grpc.ServicerContext, reply: Any) -> Any:
        if self.delay:
            self.release.wait(self.delay)
        if self.code is not None:
            context.abort(self.code, f"refused with {self.code.name}")
        return reply

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer(context, self.reply or broker_pb2.BrokerStatus(pid=1))

    def Drain(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer(context, broker_pb2.DrainReply())

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer(context, health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cxe", dir="/tmp")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def _serve(servicer: _Refusing, directory: str) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    endpoint = f"unix:{directory}/s.sock"
    server.add_insecure_port(endpoint)
    server.start()
    return server, endpoint


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


RPC_FAILURES = ["UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED",
                "UNKNOWN", "FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT", "ABORTED", "CANCELLED",
                "DATA_LOSS", "OUT_OF_RANGE", "ALREADY_EXISTS"]


@pytest.mark.parametrize("code", RPC_FAILURES)
def test_status_answered_with_an_error_code_is_an_rpc_failure_exit_3(code: str, short_dir: str) -> None:
    server, endpoint = _serve(_Refusing(grpc.StatusCode[code]), short_dir)
    try:
        result = _cli("status", "--endpoint", endpoint)
        with BrokerClient(endpoint) as client, pytest.raises(RpcFailed) as caught:
            client.status(timeout=10)
    finally:
        server.stop(None)

    assert result.returncode == 3, result
    assert f"failed: {code}: refused with {code}" in result.stderr and "cannot reach" not in result.stderr
    assert caught.value.code == code and caught.value.exit_code == 3


def test_status_answered_unavailable_is_cannot_connect_exit_2(short_dir: str) -> None:
    server, endpoint = _serve(_Refusing(grpc.StatusCode.UNAVAILABLE), short_dir)
    try:
        result = _cli("status", "--endpoint", endpoint)
    finally:
        server.stop(None)
    assert result.returncode == 2, result
    assert "cannot reach the broker" in result.stderr


def test_status_with_nothing_listening_is_cannot_connect_exit_2(short_dir: str) -> None:
    result = _cli("status", "--endpoint", f"unix:{short_dir}/nothing.sock", "--timeout", "1")
    assert result.returncode == 2, result


def test_a_status_that_outlives_its_deadline_is_a_timeout_exit_3(short_dir: str) -> None:
    servicer = _Refusing(None, delay=30.0)
    server, endpoint = _serve(servicer, short_dir)
    try:
        result = _cli("status", "--endpoint", endpoint, "--timeout", "0.5")
        with BrokerClient(endpoint) as client:
            with pytest.raises(CallTimeout):
                client.status(timeout=0.5)
            with pytest.raises(HealthTimeout):
                client.health(timeout=0.5)
    finally:
        servicer.release.set()
        server.stop(None)
    assert result.returncode == 3, result
    assert "timed out after 0.5 s" in result.stderr


def test_status_prints_a_status_with_an_infinite_drain_deadline(short_dir: str) -> None:
    server, endpoint = _serve(_Refusing(None, status=_status(math.inf)), short_dir)
    try:
        table = _cli("status", "--endpoint", endpoint)
        data = _cli("status", "--endpoint", endpoint, "--json")
    finally:
        server.stop(None)
    assert table.returncode == 0, table
    assert "deadline in ?" in table.stdout and "Traceback" not in table.stderr
    assert data.returncode == 0, data
    assert json.loads(data.stdout)["drain_deadline"] == "Infinity"


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL", "UNAUTHENTICATED"])
def test_health_check_failing_after_connecting_is_exit_3(code: str, short_dir: str) -> None:
    """grpc_health_probe's second phase: connected, then the Check failed (even UNAVAILABLE)."""
    server, endpoint = _serve(_Refusing(grpc.StatusCode[code]), short_dir)
    try:
        result = _cli("health", "--endpoint", endpoint, "--timeout", "5")
    finally:
        server.stop(None)
    assert result.returncode == 3, result
    assert "health check failed" in result.stderr


def test_health_with_nothing_listening_is_cannot_connect_exit_2(short_dir: str) -> None:
    result = _cli("health", "--endpoint", f"unix:{short_dir}/nothing.sock")
    assert result.returncode == 2, result


# -- a real TCP broker asked without its token ------------------------------------------------
def test_a_tcp_broker_asked_without_its_token_is_an_rpc_failure_not_cannot_connect(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-test\n")
    token.chmod(0o600)
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        broker = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--endpoint", "tcp:127.0.0.1:0", "--token-file", str(token),
             "--app-server", f"{sys.executable} {FAKE}", "--cwd", str(tmp_path)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        line = wait_until(lambda: next((x for x in log.read_text().splitlines() if " ready endpoint=" in x), None),
                          what="the broker's ready line")
        endpoint = line.split(" ready endpoint=", 1)[1].split()[0]

        without = _cli("status", "--endpoint", endpoint)
        with_token = _cli("status", "--endpoint", endpoint, "--token-file", str(token), "--json")
        health = _cli("health", "--endpoint", endpoint)
        with BrokerClient(endpoint) as client, pytest.raises(RpcFailed) as caught:
            client.drain(0.0, reason="no token", timeout=10)
    finally:
        broker.terminate()  # our own child: drain and exit
        broker.wait(timeout=30)

    assert without.returncode == 3, without
    assert "UNAUTHENTICATED" in without.stderr and "cannot reach" not in without.stderr
    assert caught.value.code == "UNAUTHENTICATED"
    assert with_token.returncode == 0 and json.loads(with_token.stdout)["pid"] == broker.pid, with_token
    assert health.returncode == 0, health  # Health answers anyone


def test_every_error_class_the_client_raises_names_its_exit_code() -> None:
    assert (ConnectError.exit_code, HealthTimeout.exit_code, CallTimeout.exit_code, RpcFailed.exit_code) == (2, 3, 3, 3)
