"""The broker's lifetime against a misbehaving app-server: one that closes its stdout but keeps
running, one that wedges while the broker drains, Drain deadlines that are not numbers a
clock can use, and descendants of the app-server that left its process group."""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    NOT_SERVING,
    SessionClient,
    aio_channel,
    next_status,
    run,
    status,
    wait_for,
    wait_gone,
)

from protos import broker_pb2, broker_pb2_grpc
from proxy.broker import MAX_DRAIN_DEADLINE, drain_seconds

DEFAULT_DEADLINE = 3600.0


async def call(channel, method: str, params, timeout: float = 30) -> broker_pb2.CallReply:
    request = broker_pb2.CallRequest(method=method, params_json=json.dumps(params))
    return await broker_pb2_grpc.AppServerStub(channel).Call(request, timeout=timeout)


async def watch_health(channel):
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    await next_status(watch, health_pb2.HealthCheckResponse.SERVING, 10)
    return watch


async def wait_exit(b, timeout: float = 30.0) -> int:
    return await asyncio.to_thread(b.wait_exit, timeout)


# -- an app-server that closes its stdout ------------------------------------------------
def test_an_app_server_that_closes_its_stdout_but_runs_on_is_gone_and_the_broker_exits_1(broker):
    b = broker()
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as waiter:
            watch = await watch_health(channel)
            slow = await waiter.send_request("fake/slow", {"seconds": 60})
            slow_call = asyncio.ensure_future(call(channel, "fake/slow", {"seconds": 60}))
            closing = asyncio.ensure_future(call(channel, "fake/closeStdout", {}))
            start = time.monotonic()
            reply = await asyncio.wait_for(slow, 15)
            assert time.monotonic() - start < 15
            assert "closed its stdout" in reply["error"]["message"], reply
            assert "closed its stdout" in (await slow_call).error.message
            assert "closed its stdout" in (await closing).error.message
            await next_status(watch, NOT_SERVING, 5)
            assert await waiter.wait_end(10) == grpc.StatusCode.UNAVAILABLE
            assert await wait_exit(b, 15) == 1
            watch.cancel()

    run(main())
    assert not wait_gone([app], 5)


def test_an_app_server_whose_stdout_a_descendant_holds_is_gone_soon_after_its_exit(broker):
    b = broker()
    holder = psutil.Process(json.loads(b.call("fake/spawn", {"seconds": 300, "holdStdout": True}).result_json)["pid"])
    start = time.monotonic()
    reply = b.call("fake/exit", {"code": 4}, timeout=30)
    assert "exited with status 4" in reply.error.message, reply
    assert b.wait_exit(30) == 1
    assert time.monotonic() - start < 15
    assert not wait_gone([holder], 5)  # and the broker, its subreaper, stopped the holder


# -- a wedge while draining --------------------------------------------------------------
def test_a_wedge_while_draining_fails_the_turns_within_seconds_and_exits_1(broker):
    b = broker()  # default settings: probe every 1 s, wedged after 3 s, drain deadline 1 hour
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            await s.start_turn(thread, "deltas=10 seconds=120")
            await s.until(lambda m: m.get("method") == "turn/started")
            await broker_pb2_grpc.BrokerStub(channel).Drain(broker_pb2.DrainRequest(reason="test"), timeout=10)
            st = await status(channel)
            assert st.state == broker_pb2.BROKER_STATE_DRAINING and len(st.in_flight_turns) == 1
            app.suspend()  # SIGSTOP: wedged, still alive
            wedged_at = time.monotonic()
            code = await s.wait_end(20)
            heard_after = time.monotonic() - wedged_at
            assert code == grpc.StatusCode.UNAVAILABLE, s.details
            assert "stopped answering" in (s.details or ""), s.details
            # wedged after the 3 s threshold (+ up to 1 s probe interval); told at once
            assert heard_after < 10, f"the turn's client heard only after {heard_after:.1f} s"
            assert await wait_exit(b, 15) == 1

    run(main())
    assert not wait_gone([app], 5)


# -- Drain deadlines ---------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "expected"), [
    (None, DEFAULT_DEADLINE), (0.0, DEFAULT_DEADLINE), (-5.0, DEFAULT_DEADLINE), (math.nan, DEFAULT_DEADLINE),
    (-math.inf, DEFAULT_DEADLINE), (math.inf, MAX_DRAIN_DEADLINE), (1e300, MAX_DRAIN_DEADLINE),
    (30.0, 30.0), (MAX_DRAIN_DEADLINE + 1, MAX_DRAIN_DEADLINE)])
def test_drain_seconds_defaults_the_unset_and_clamps_the_absurd(requested, expected):
    assert drain_seconds(requested, DEFAULT_DEADLINE) == expected


@pytest.mark.parametrize(("requested", "expected"), [
    (math.inf, MAX_DRAIN_DEADLINE), (1e300, MAX_DRAIN_DEADLINE), (math.nan, DEFAULT_DEADLINE),
    (-math.inf, DEFAULT_DEADLINE)])
def test_a_drain_with_an_absurd_deadline_gets_a_finite_one_and_the_turn_runs_on(broker, requested, expected):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            await s.start_turn(thread, "deltas=10 seconds=60")
            await s.until(lambda m: m.get("method") == "turn/started")
            before = time.time()
            reply = await broker_pb2_grpc.BrokerStub(channel).Drain(
                broker_pb2.DrainRequest(deadline_seconds=requested, reason="test"), timeout=10)
            assert reply.state == broker_pb2.BROKER_STATE_DRAINING
            st = await status(channel)
            assert math.isfinite(st.drain_deadline), st.drain_deadline
            assert before + expected - 5 < st.drain_deadline < time.time() + expected + 5, st.drain_deadline
            assert st.state == broker_pb2.BROKER_STATE_DRAINING and len(st.in_flight_turns) == 1
            assert b.proc.poll() is None

    run(main())
    b.drain(force=True)
    assert b.wait_exit(30) == 0


# -- descendants of the app-server -------------------------------------------------------
@pytest.mark.parametrize("how", ["drain", "app-server-exit"])
def test_a_setsid_descendant_of_the_app_server_does_not_outlive_the_broker(broker, how):
    b = broker()
    reply = b.call("fake/spawn", {"seconds": 300})
    pid = json.loads(reply.result_json)["pid"]
    tool = psutil.Process(pid)
    assert tool.pid != os.getpgid(pid) or os.getsid(pid) == pid  # its own session: the group kill misses it
    if how == "drain":
        b.drain()
        assert b.wait_exit(30) == 0
    else:
        b.call("fake/exit", {"code": 4}, timeout=30)
        assert b.wait_exit(30) == 1
    assert not wait_gone([tool], 5), f"{tool} outlived the broker"
    assert "stopping the descendants left behind (1)" in b.log()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])  # uvloop keeps SIGCHLD: a plain handler then
def test_an_orphaned_descendant_is_adopted_and_reaped_while_the_broker_runs(broker, loop):
    b = broker("--event-loop", loop)
    reply = b.call("fake/spawn", {"seconds": 5, "orphan": True})
    pid = json.loads(reply.result_json)["pid"]
    assert psutil.Process(pid).ppid() == b.pid  # the broker is its subreaper
    wait_for(lambda: not psutil.pid_exists(pid), what="the orphan to exit and be reaped (no zombie left)")
    assert b.health() == health_pb2.HealthCheckResponse.SERVING
    assert f"reaped orphaned descendant pid={pid}" in b.log()
    app = b.app_server
    os.kill(app.pid, signal.SIGKILL)
    assert b.wait_exit(30) == 1
    assert "was killed by SIGKILL" in b.log()  # the app-server's own status, not taken by the reaper
