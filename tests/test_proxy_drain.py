"""Drain, SIGTERM, deadlines, idle exit, and a killed broker taking its app-server along."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    NOT_SERVING,
    SERVING,
    SessionClient,
    aio_channel,
    is_turn_completed,
    next_status,
    run,
    status,
    status_until,
    wait_gone,
)

from protos import broker_pb2, broker_pb2_grpc

DRAINING_ERROR = {"code": -32600, "message": "Server is draining; retry after reconnecting",
                  "data": {"reason": "serverShuttingDown"}}
EXIT_AFTER_LAST_TURN = 5.0  # design: gone within 1 s of its last turn; a wide margin here


async def drain(channel, deadline_seconds: float = 0.0, force: bool = False) -> broker_pb2.DrainReply:
    request = broker_pb2.DrainRequest(deadline_seconds=deadline_seconds, force=force, reason="test")
    return await broker_pb2_grpc.BrokerStub(channel).Drain(request, timeout=10)


async def call(channel, method: str, params) -> broker_pb2.CallReply:
    request = broker_pb2.CallRequest(method=method, params_json=json.dumps(params))
    return await broker_pb2_grpc.AppServerStub(channel).Call(request, timeout=30)


async def wait_exit(b, timeout: float = 30.0) -> int:
    return await asyncio.to_thread(b.wait_exit, timeout)


async def watch_health(channel):
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    await next_status(watch, SERVING, 10)
    return watch


async def running_turn(s: SessionClient, text: str) -> tuple[str, str]:
    thread = await s.start_thread()
    turn = await s.start_turn(thread, text)
    await s.until(lambda m: m.get("method") == "turn/started")
    return thread, turn


def assert_cleaned_up(b) -> None:
    assert not os.path.lexists(b.sock), "socket left behind"
    assert not os.path.exists(b.dir), "socket directory left behind"


async def assert_refuses_new_sessions(channel) -> None:
    refused = SessionClient(channel)
    assert await refused.wait_end(10) == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (refused.details or "")


def test_drain_lets_the_inflight_turn_finish_then_exits_0(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            watch = await watch_health(channel)  # stays open: must not hold the stop
            thread, turn = await running_turn(s, "deltas=30 seconds=3")
            reply = await drain(channel)
            assert reply.state == broker_pb2.BROKER_STATE_DRAINING
            assert reply.in_flight_turns == 1
            await next_status(watch, NOT_SERVING, 5)
            assert (await status(channel)).state == broker_pb2.BROKER_STATE_DRAINING
            await assert_refuses_new_sessions(channel)
            # New work inside an open Session gets codex's own draining error...
            for method in ("thread/start", "turn/start"):
                refused = await s.request(method, {"threadId": thread, "input": []})
                assert refused["error"] == DRAINING_ERROR, refused
            refused_call = await call(channel, "thread/start", {})
            assert refused_call.WhichOneof("outcome") == "error"
            assert (refused_call.error.code, refused_call.error.message) == (-32600, DRAINING_ERROR["message"])
            assert json.loads(refused_call.error.data_json) == {"reason": "serverShuttingDown"}
            # ...while reads keep working.
            read = await s.result("thread/read", {"threadId": thread})
            assert read["thread"]["id"] == thread
            assert (await call(channel, "thread/loaded/list", {})).WhichOneof("outcome") == "result_json"
            completed = await s.turn_completed(thread, turn)
            assert completed["params"]["turn"]["status"] == "completed"
            done_at = time.monotonic()
            assert await wait_exit(b) == 0
            elapsed = time.monotonic() - done_at
            assert elapsed < EXIT_AFTER_LAST_TURN, f"broker exited {elapsed:.2f} s after the last turn"
            assert await s.wait_end(10) == grpc.StatusCode.OK, s.details
            watch.cancel()

    run(main())
    assert_cleaned_up(b)


def test_sigterm_drains_like_the_drain_rpc(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            watch = await watch_health(channel)
            thread, turn = await running_turn(s, "deltas=20 seconds=2")
            os.kill(b.pid, signal.SIGTERM)
            await next_status(watch, NOT_SERVING, 5)
            st = await status(channel)
            assert st.state == broker_pb2.BROKER_STATE_DRAINING and st.drain_reason == "SIGTERM"
            await assert_refuses_new_sessions(channel)
            assert (await s.request("thread/start", {}))["error"] == DRAINING_ERROR
            completed = await s.turn_completed(thread, turn)
            assert completed["params"]["turn"]["status"] == "completed"
            assert await wait_exit(b) == 0
            watch.cancel()

    run(main())
    assert_cleaned_up(b)


def test_second_sigint_stops_at_once(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            watch = await watch_health(channel)
            await running_turn(s, "deltas=10 seconds=60")
            os.kill(b.pid, signal.SIGINT)
            await next_status(watch, NOT_SERVING, 5)
            os.kill(b.pid, signal.SIGINT)
            assert await wait_exit(b, 15) == 0
            assert await s.wait_end(10) is not None
            watch.cancel()

    run(main())
    assert_cleaned_up(b)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("how", ["second SIGINT", "forced drain"])
def test_a_call_still_pending_when_the_broker_stops_gets_an_error_reply_not_a_cancelled_rpc(broker, how, loop):
    """A Call the app-server never answers before the stop (here: it would take a minute) is
    answered by the broker once it has stopped the app-server (-32002, which a client may
    retry), not left for gRPC to cancel when the server stops."""
    b = broker("--event-loop", loop)

    async def main():
        async with aio_channel(b) as channel:
            pending = asyncio.ensure_future(call(channel, "fake/slow", {"seconds": 60}))
            await status_until(channel, lambda st: st.pending_requests == 1)
            if how == "second SIGINT":
                os.kill(b.pid, signal.SIGINT)
                await status_until(channel, lambda st: st.state == broker_pb2.BROKER_STATE_DRAINING)
                os.kill(b.pid, signal.SIGINT)
            else:
                await drain(channel, force=True)
            reply = await asyncio.wait_for(pending, 30)
            assert reply.HasField("error"), reply
            assert reply.error.code == -32002 and "stopped" in reply.error.message, reply
        assert await wait_exit(b, 30) == 0

    run(main())
    assert_cleaned_up(b)


def test_repeated_sigterms_are_one_drain_and_the_turn_completes(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            watch = await watch_health(channel)
            thread, turn = await running_turn(s, "deltas=20 seconds=3")
            os.kill(b.pid, signal.SIGTERM)
            await next_status(watch, NOT_SERVING, 5)
            for _ in range(3):  # clients ending together: each asks for a drain
                os.kill(b.pid, signal.SIGTERM)
                await status(channel)
            st = await status(channel)
            assert st.state == broker_pb2.BROKER_STATE_DRAINING and st.in_flight_turns, st
            completed = await s.turn_completed(thread, turn)
            assert completed["params"]["turn"]["status"] == "completed"
            assert await wait_exit(b) == 0
            watch.cancel()

    run(main())
    assert_cleaned_up(b)


@pytest.mark.parametrize("how", ["deadline", "force", "sigterm-default-deadline"])
def test_drain_interrupts_a_long_turn_at_its_deadline_and_exits_0(broker, how):
    b = broker("--drain-deadline", "1") if how == "sigterm-default-deadline" else broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread, turn = await running_turn(s, "deltas=10 seconds=60")
            start = time.monotonic()
            if how == "deadline":
                await drain(channel, deadline_seconds=1)
            elif how == "force":
                await drain(channel, force=True)
            else:
                os.kill(b.pid, signal.SIGTERM)
            completed = await s.turn_completed(thread, turn, timeout=20)
            assert completed["params"]["turn"]["status"] == "interrupted"
            elapsed = time.monotonic() - start
            assert elapsed < 15, f"turn interrupted only after {elapsed:.1f} s"
            assert await wait_exit(b) == 0

    run(main())
    assert_cleaned_up(b)


def test_drain_reply_is_immediate_and_a_later_drain_shortens_but_never_extends(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread, turn = await running_turn(s, "deltas=10 seconds=60")
            slow = await s.send_request("fake/slow", {"seconds": 2})
            await s.result("thread/loaded/list")  # the broker has sent fake/slow by now
            before = time.time()
            reply = await drain(channel)  # no deadline: the default (1 hour), never "now"
            assert time.time() - before < 5
            assert (reply.state, reply.in_flight_turns, reply.pending_requests) == (
                broker_pb2.BROKER_STATE_DRAINING, 1, 1)
            st = await status(channel)
            assert 3500 < st.drain_deadline - before < 3700, st.drain_deadline - before
            assert len(st.in_flight_turns) == 1

            await drain(channel, deadline_seconds=60)
            shortened = (await status(channel)).drain_deadline
            assert 50 < shortened - before < 70
            await drain(channel, deadline_seconds=3600)
            assert (await status(channel)).drain_deadline == shortened  # never extended

            assert "result" in await asyncio.wait_for(slow, 30)  # pending requests still answered
            await drain(channel, deadline_seconds=0.5)
            completed = await s.turn_completed(thread, turn, timeout=20)
            assert completed["params"]["turn"]["status"] == "interrupted"
            assert await wait_exit(b) == 0

    run(main())
    assert_cleaned_up(b)


def test_idle_broker_exits_0_by_itself(broker):
    b = broker("--idle-timeout", "1")
    assert b.wait_exit(15) == 0
    assert_cleaned_up(b)


def test_idle_timeout_does_not_stop_a_broker_with_an_open_session(broker):
    b = broker("--idle-timeout", "2")

    async def main():
        async with aio_channel(b) as channel:
            s = SessionClient(channel)
            await s.result("thread/loaded/list")
            await asyncio.sleep(4)  # twice the idle timeout, with the Session open and quiet
            assert b.proc.poll() is None, "broker stopped with a Session open"
            assert (await status(channel)).open_sessions == 1
            await s.close()
            assert await wait_exit(b, 15) == 0

    run(main())
    assert_cleaned_up(b)


@pytest.mark.parametrize("fake_args", [[], ["--ignore-stdin-eof"]], ids=["plain", "ignores-stdin-eof"])
def test_sigkilled_broker_takes_its_app_server_along(broker, fake_args):
    b = broker(fake_args=fake_args)
    app = b.app_server
    os.kill(b.pid, signal.SIGKILL)
    b.wait_exit(10)
    start = time.monotonic()
    left = wait_gone([app], 10)
    assert not left, f"app-server {app.pid} still running {time.monotonic() - start:.1f} s after the broker died"


def test_stop_escalates_when_the_app_server_ignores_stdin_eof(broker):
    b = broker(fake_args=["--ignore-stdin-eof"])
    app = b.app_server
    b.drain()
    assert b.wait_exit(20) == 0
    assert not wait_gone([app], 5)
    assert_cleaned_up(b)


def test_turn_completed_while_draining_is_seen_by_every_subscriber(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as a, SessionClient(channel) as c:
            thread, turn = await running_turn(a, "deltas=5 seconds=1")
            await c.result("thread/read", {"threadId": thread})
            await drain(channel)
            await asyncio.gather(a.turn_completed(thread, turn), c.turn_completed(thread, turn))
            assert await wait_exit(b) == 0
            for s in (a, c):
                assert any(is_turn_completed(m, thread, turn) for m in s.messages)

    run(main())


def test_drain_waits_for_a_review_turn_on_its_review_thread(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            started = await s.result("review/start", {
                "threadId": thread, "target": {"type": "custom", "instructions": "deltas=5 seconds=1.5"}})
            review_thread, turn = started["reviewThreadId"], started["turn"]["id"]
            assert review_thread != thread
            st = await status(channel)
            assert [(t.thread_id, t.turn_id) for t in st.in_flight_turns] == [(review_thread, turn)]
            assert (await drain(channel)).in_flight_turns == 1
            completed = await s.turn_completed(review_thread, turn)  # subscribed by the result
            assert completed["params"]["turn"]["status"] == "completed"
            assert await wait_exit(b) == 0

    run(main())
    assert_cleaned_up(b)


def test_compaction_turn_without_turn_id_is_tracked_by_its_notifications(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            assert await s.result("thread/compact/start", {"threadId": thread}) == {}
            completed = await s.turn_completed(thread)
            assert completed["params"]["turn"]["status"] == "completed"
            st = await status(channel)
            assert list(st.in_flight_turns) == [] and st.pending_requests == 0

    run(main())


@pytest.mark.parametrize("round_", range(5))
def test_a_call_in_flight_at_drain_gets_its_reply_before_the_broker_stops(broker, round_):
    """The Call is the last work: its answer completes the drain, and the broker stops at once
    (no Session to flush). The reply must still reach the caller, not a CANCELLED."""
    b = broker()

    async def main():
        async with aio_channel(b) as channel:
            in_flight = asyncio.ensure_future(call(channel, "fake/slow", {"seconds": 0.3}))
            await status_until(channel, lambda st: st.pending_requests == 1)
            await drain(channel)
            reply = await asyncio.wait_for(in_flight, 15)
            assert reply.result_json and not reply.HasField("error"), reply
        assert await wait_exit(b) == 0

    run(main())
    assert_cleaned_up(b)


def test_a_health_watch_ends_ok_after_the_final_not_serving_when_the_broker_stops(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            unknown = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="no.such"))
            assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            await drain(channel)
            seen = []
            while (reply := await watch.read()) is not grpc.aio.EOF:
                seen.append(reply.status)
            assert seen and seen[-1] == NOT_SERVING, seen
            assert await watch.code() == grpc.StatusCode.OK
            assert await unknown.read() is grpc.aio.EOF
            assert await unknown.code() == grpc.StatusCode.OK
        assert await wait_exit(b) == 0

    run(main())
    assert_cleaned_up(b)


def test_sigterms_while_the_broker_exits_never_turn_its_exit_0_into_a_death(broker):
    """Two clients' teardowns: the second SIGTERM may land while the broker is already exiting
    (its own handlers gone). The exit status stays 0: a late signal has nothing left to stop."""
    b = broker()
    stop = threading.Event()

    def keep_signalling() -> None:
        while not stop.is_set() and b.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(b.pid, signal.SIGTERM)
            stop.wait(0.0005)

    b.drain(reason="test: nothing in flight, stop at once")
    sender = threading.Thread(target=keep_signalling, name="sigterms")
    sender.start()
    try:
        assert b.wait_exit() == 0, b.tail()
    finally:
        stop.set()
        sender.join()
