"""The health endpoint (``--health-endpoint``): grpc.health.v1 Check and Watch and reflection of
Health only, with no token, on any address; ``codexbroker.v1.Liveness`` (NOT_SERVING only while
the app-server is wedged or gone, SERVING while draining) wherever Health is served; reflection
on the token-guarded endpoint that finds Health, and nothing else, without the token; and
``--token-file`` on a unix endpoint, supported and documented."""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from harness import (
    NOT_SERVING,
    SERVING,
    SessionClient,
    aio_channel,
    fake_command,
    health_name,
    new_marker,
    next_status,
    processes_with,
    run,
    wait_for,
    wait_gone,
)

from protos import broker_pb2, broker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
LIVENESS = "codexbroker.v1.Liveness"
HEALTH = "grpc.health.v1.Health"
HIDDEN_SYMBOLS = ("codexbroker.v1.AppServer", "codexbroker.v1.Broker", "codexbroker.v1.StatusRequest")
FAST_PROBES = ("--probe-interval", "0.2", "--probe-timeout", "1", "--exit-when-wedged", "0")


def health_target(b) -> str:
    """The health endpoint the broker bound (its log says which port 0 became), as a grpc target."""
    found = wait_for(lambda: re.search(r"health endpoint=(\S+)", b.log()), what="the health endpoint log line")
    endpoint = found.group(1)
    if endpoint.startswith("tcp:0.0.0.0:"):
        return "127.0.0.1:" + endpoint.rsplit(":", 1)[1]
    return endpoint.removeprefix("tcp:")


def check(channel: grpc.Channel, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_name(reply.status)


def check_until(channel: grpc.Channel, service: str, want: str, timeout: float = 20.0) -> None:
    seen: list[str] = []

    def now() -> bool:
        seen[:] = [check(channel, service)]
        return seen[0] == want

    try:
        wait_for(now, timeout, f"Health {service!r} {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None


def assert_reflects_health_only(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    assert list(db.get_services()) == [HEALTH]
    described = db.FindFileContainingSymbol(HEALTH)
    assert described.name == health_pb2.DESCRIPTOR.name
    assert {"Check", "Watch"} <= {m.name for m in described.service[0].method}
    for symbol in HIDDEN_SYMBOLS:
        with pytest.raises(KeyError):
            db.FindFileContainingSymbol(symbol)
    with pytest.raises(KeyError):
        db.FindFileByName(broker_pb2.DESCRIPTOR.name)


def test_health_endpoint_on_any_address_serves_health_liveness_and_reflection_of_health_only(served):
    b = served("--health-endpoint", "tcp:0.0.0.0:0")
    with grpc.insecure_channel(health_target(b)) as channel:
        for service in ("", "codexbroker.v1.AppServer", LIVENESS):
            assert check(channel, service) == "SERVING"
        with pytest.raises(grpc.RpcError) as unknown:
            check(channel, "codexbroker.v1.Nothing")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=LIVENESS),
                                                          timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()
        assert_reflects_health_only(channel)
        with pytest.raises(grpc.RpcError) as absent:  # the broker's own services are not here at all
            broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=10)
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_endpoint_on_a_unix_socket_is_removed_when_the_broker_stops(served, tmp_path):
    path = tmp_path / "health.sock"
    b = served("--health-endpoint", f"unix:{path}")
    with grpc.insecure_channel(f"unix:{path}") as channel:
        assert check(channel, LIVENESS) == "SERVING"
        assert_reflects_health_only(channel)
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    assert not path.exists(), "health socket left behind"


def test_health_endpoint_on_a_path_in_use_is_refused_with_exit_2(tmp_path):
    path = tmp_path / "health.sock"
    path.write_text("")
    sock = tmp_path / "d" / "s.sock"
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--endpoint", f"unix:{sock}",
                             "--health-endpoint", f"unix:{path}", "--app-server", "true"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "health socket path is taken by something that is not a socket" in result.stderr
    assert not sock.parent.exists()


def test_liveness_stays_serving_while_draining_as_readiness_goes_not_serving(served):
    b = served("--health-endpoint", "tcp:127.0.0.1:0", "--drain-deadline", "60")
    target = health_target(b)

    async def main() -> None:
        async with aio_channel(b) as channel, SessionClient(channel) as s, \
                grpc.aio.insecure_channel(target) as health_channel:
            thread = await s.start_thread()
            await s.start_turn(thread, "deltas=30 seconds=30")
            await s.until(lambda m: m.get("method") == "turn/started")
            liveness = health_pb2_grpc.HealthStub(health_channel).Watch(
                health_pb2.HealthCheckRequest(service=LIVENESS))
            await next_status(liveness, SERVING, 10)
            readiness = health_pb2_grpc.HealthStub(health_channel).Watch(health_pb2.HealthCheckRequest(service=""))
            await next_status(readiness, SERVING, 10)
            await broker_pb2_grpc.BrokerStub(channel).Drain(broker_pb2.DrainRequest(reason="test"), timeout=10)
            await next_status(readiness, NOT_SERVING, 10)
            for stub in (health_pb2_grpc.HealthStub(health_channel), health_pb2_grpc.HealthStub(channel)):
                ready = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                alive = await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=10)
                assert (ready.status, alive.status) == (NOT_SERVING, SERVING)
            assert (await broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=10)
                    ).state == broker_pb2.BROKER_STATE_DRAINING
            liveness.cancel()
            readiness.cancel()
            await broker_pb2_grpc.BrokerStub(channel).Drain(broker_pb2.DrainRequest(force=True, reason="test"),
                                                            timeout=10)

    run(main())
    assert b.wait_exit(60) == 0


def test_liveness_goes_not_serving_while_the_app_server_is_wedged_and_back_when_it_answers(served):
    b = served("--health-endpoint", "tcp:127.0.0.1:0", *FAST_PROBES)
    app = b.app_server
    with grpc.insecure_channel(health_target(b)) as channel:
        assert check(channel, LIVENESS) == "SERVING"
        app.send_signal(signal.SIGSTOP)
        try:
            check_until(channel, LIVENESS, "NOT_SERVING")
            assert check(channel, "") == "NOT_SERVING"
            assert check(b.channel, LIVENESS) == "NOT_SERVING"  # the main endpoint says the same
        finally:
            app.send_signal(signal.SIGCONT)
        check_until(channel, LIVENESS, "SERVING")
        assert check(channel, "") == "SERVING"


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[str, str]:
    token = secrets.token_urlsafe(24)
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path), token


def test_guarded_tcp_reflection_describes_health_without_the_token_and_everything_with_it(served, token_file):
    b = served("--token-file", token_file[0], "--health-endpoint", "tcp:127.0.0.1:0")
    # The main endpoint is a unix socket here; the guard is the same on TCP (see below).
    with grpc.insecure_channel(b.endpoint) as channel:
        assert_reflects_health_only(channel)
        with pytest.raises(grpc.RpcError) as refused:
            broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "--token-file" in (refused.value.details() or "")
        authorized = grpc.intercept_channel(channel, _BearerInterceptor(token_file[1]))
        assert {*ProtoReflectionDescriptorDatabase(authorized).get_services()} >= {
            HEALTH, "codexbroker.v1.AppServer", "codexbroker.v1.Broker"}
        assert broker_pb2_grpc.BrokerStub(authorized).Status(broker_pb2.StatusRequest(), timeout=10).state == \
            broker_pb2.BROKER_STATE_SERVING


def test_guarded_tcp_endpoint_reflects_health_to_anyone_and_nothing_else(token_file):
    marker = new_marker()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--endpoint", "tcp:127.0.0.1:0",
                             "--token-file", token_file[0], "--app-server", fake_command(marker=marker)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        endpoint = None
        for line in proc.stderr:
            if " ready endpoint=" in line:
                endpoint = line.split(" ready endpoint=", 1)[1].split()[0]
                break
        assert endpoint, "the broker never said ready"
        with grpc.insecure_channel(endpoint.removeprefix("tcp:")) as channel:
            assert check(channel, LIVENESS) == "SERVING"
            assert_reflects_health_only(channel)
            with pytest.raises(grpc.RpcError) as refused:
                broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stderr is not None:
            proc.stderr.close()
        assert not wait_gone(processes_with(marker), 10)


def test_token_file_on_a_unix_endpoint_is_enforced_and_documented(served, token_file):
    help_text = subprocess.run([sys.executable, "-m", "proxy", "serve", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout
    flat = " ".join(help_text.split())
    assert "optional with a unix: one" in flat, help_text
    assert "TCP only: a 0600 file" not in flat
    b = served("--token-file", token_file[0])
    with pytest.raises(grpc.RpcError) as refused:
        b.status()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "TCP" not in (refused.value.details() or "")
    assert b.health() == SERVING
    authorized = grpc.intercept_channel(b.channel, _BearerInterceptor(token_file[1]))
    assert broker_pb2_grpc.BrokerStub(authorized).Status(broker_pb2.StatusRequest(), timeout=10).pid == b.pid
    assert os.path.exists(b.sock)


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._metadata = [("authorization", f"Bearer {token}")]

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def test_health_endpoint_on_a_port_in_use_is_refused_with_exit_2_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        marker = new_marker()
        sock = tmp_path / "d" / "s.sock"
        result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--endpoint", f"unix:{sock}",
                                 "--health-endpoint", f"tcp:127.0.0.1:{port}", "--app-server",
                                 fake_command(marker=marker)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on tcp:127.0.0.1:{port}" in result.stderr
    assert not sock.parent.exists(), "socket directory left behind"
    assert not wait_gone(processes_with(marker), 10)
