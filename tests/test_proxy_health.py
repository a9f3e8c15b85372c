"""grpc.health.v1 from a real round trip to the app-server, and server reflection."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from harness import (
    NOT_SERVING,
    SERVING,
    aio_channel,
    methods_in,
    next_status,
    read_request_log,
    run,
    wait_for,
)

Status = health_pb2.HealthCheckResponse


def test_health_is_not_reachable_until_the_app_server_handshake_is_done(broker, tmp_path):
    log = tmp_path / "requests.jsonl"
    b = broker(env={"FAKE_STARTUP_SECONDS": "3", "FAKE_LOG_REQUESTS": str(log)}, ready=False)
    wait_for(lambda: "initialize" in methods_in(read_request_log(log)), what="the app-server to get initialize")
    # The broker listens only once the app-server has answered initialize: no socket yet, so
    # nothing can connect, let alone be told SERVING.
    assert not os.path.exists(b.sock)
    with grpc.insecure_channel(b.endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert b.proc.poll() is None
    b.wait_ready()
    assert b.status().health == "SERVING"


def test_health_serves_both_service_names_and_not_found_for_others(broker):
    b = broker()
    assert b.health("") == SERVING
    assert b.health("codexbroker.v1.AppServer") == SERVING
    with pytest.raises(grpc.RpcError) as info:
        b.health("codexbroker.v1.Nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stopped_app_server_turns_watch_not_serving_within_5s_and_back_after_sigcont(broker):
    b = broker()
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            await next_status(watch, SERVING, 10)
            os.kill(app.pid, signal.SIGSTOP)
            try:
                elapsed = await next_status(watch, NOT_SERVING, 10)
                assert elapsed < 10, f"NOT_SERVING after {elapsed:.2f} s (design: within 5 s)"
                # A Check with grpc_health_probe's 1 s deadline is answered NOT_SERVING, not failed.
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="codexbroker.v1.AppServer"),
                                         timeout=1.0)
                assert reply.status == NOT_SERVING
            finally:
                os.kill(app.pid, signal.SIGCONT)
            await next_status(watch, SERVING, 10)
            watch.cancel()
        print(f"wedged app-server reported NOT_SERVING after {elapsed:.2f} s")

    run(main())
    assert b.health() == SERVING


@pytest.mark.parametrize("probe_method", [None, "config/read"], ids=["default", "flag"])
def test_quiet_broker_probes_the_app_server_with_the_probe_method(broker, tmp_path, probe_method):
    log = tmp_path / "requests.jsonl"
    flags = ["--probe-interval", "0.3", *(["--probe-method", probe_method] if probe_method else [])]
    b = broker(*flags, env={"FAKE_LOG_REQUESTS": str(log)})
    method = probe_method or "thread/loaded/list"

    def probes() -> int:
        return methods_in(read_request_log(log)).count(method)

    wait_for(lambda: probes() >= 2, what=f"two {method} probes while quiet")
    before = probes()
    quiet_since = time.time()
    # A probe logged before `before` may be answered after `quiet_since`: wait for both a new
    # probe on the app-server's side and a probe answered after the quiet period.
    wait_for(lambda: probes() > before and b.status().last_probe_at > quiet_since,
             what="a new probe after a quiet period")
    assert b.health() == SERVING
    status = b.status()
    assert status.last_probe_at > quiet_since
    assert status.last_probe_latency_ms > 0
    others = {"thread/loaded/list", "config/read"} - {method}
    assert not others & set(methods_in(read_request_log(log)))


def test_server_reflection_lists_the_services(broker):
    b = broker()
    database = ProtoReflectionDescriptorDatabase(b.channel)
    services = set(database.get_services())
    assert {"codexbroker.v1.AppServer", "codexbroker.v1.Broker", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services, services
    pool = DescriptorPool(database)
    methods = {m.name for m in pool.FindServiceByName("codexbroker.v1.AppServer").methods}
    assert methods == {"Session", "Call"}
    assert {m.name for m in pool.FindServiceByName("codexbroker.v1.Broker").methods} == {"Status", "Drain"}
