"""Faults: bad input from clients and from the app-server, oversized messages, a client that
never reads, and the app-server dying mid-turn. None of them may take the broker down (except
the app-server's death, which ends it with status 1)."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    SERVING,
    SessionClient,
    aio_channel,
    run,
    status_until,
    wait_gone,
)

from protos import broker_pb2, broker_pb2_grpc

MAX_MESSAGE = 64 << 20  # the broker's max receive message size


async def health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def call(channel, method: str, params, timeout: float = 30) -> broker_pb2.CallReply:
    request = broker_pb2.CallRequest(method=method, params_json=json.dumps(params))
    return await broker_pb2_grpc.AppServerStub(channel).Call(request, timeout=timeout)


BAD_CLIENT_MESSAGES = [
    # (text sent, expected error code, expected id)
    ("this is not json{", -32700, None),
    ("", -32700, None),
    ('{"id": 1, "method": "x"', -32700, None),
    ("[1, 2, 3]", -32600, None),
    ('[{"id": 1, "method": "thread/loaded/list"}]', -32600, None),
    ("42", -32600, None),
    ('"a string"', -32600, None),
    ("null", -32600, None),
    ('{"id": 7, "params": {}}', -32600, 7),
    ('{"id": "s-8", "method": 5}', -32600, "s-8"),
    ('{"id": 9, "method": ""}', -32600, 9),
    ('{"id": 1.5, "method": "thread/loaded/list"}', -32600, None),
    ('{"id": true, "method": "thread/loaded/list"}', -32600, None),
    ('{"id": null, "method": "thread/loaded/list"}', -32600, None),
    ('{"id": [1], "method": "thread/loaded/list"}', -32600, None),
    ('{"id": {"a": 1}, "method": "thread/loaded/list"}', -32600, None),
]


def test_bad_client_messages_get_one_error_each_and_the_session_stays_usable(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            for text, code, req_id in BAD_CLIENT_MESSAGES:
                await s.send(text)
                ok = await s.request("thread/loaded/list")  # the Session still works
                assert "result" in ok
                *errors, reply = await s.until(lambda m, ok=ok: m is ok)
                assert len(errors) == 1, (text, errors)
                assert errors[0]["error"]["code"] == code, (text, errors[0])
                assert errors[0]["id"] == req_id and type(errors[0]["id"]) is type(req_id), (text, errors[0])
            assert await health(channel) == SERVING

    run(main())


@pytest.mark.parametrize("kind", ["json", "utf8", "array", "empty", "noid"])
def test_garbage_lines_from_the_app_server_are_skipped(broker, kind):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            assert await s.result("fake/garbage", {"kind": kind}) == {"ok": True}
            reply = await call(channel, "fake/garbage", {"kind": kind})
            assert json.loads(reply.result_json) == {"ok": True}
            assert await s.result("thread/loaded/list")
            assert await health(channel) == SERVING
            assert len(s.messages) == 2, s.messages  # nothing of the garbage reached the Session

    run(main())
    if kind != "empty":
        assert "app-server line skipped" in b.log()


def test_a_20mb_line_passes_intact_to_a_session_and_to_a_call(broker):
    b = broker()
    size = 20_000_000

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            result = await s.result("fake/big", {"bytes": size})
            assert result["data"] == "x" * size
            reply = await call(channel, "fake/big", {"bytes": size})
            assert json.loads(reply.result_json)["data"] == "x" * size
            assert await s.result("thread/loaded/list")
            assert await health(channel) == SERVING

    run(main())


def test_big_results_amid_a_delta_stream_do_not_drop_a_session_that_reads(broker):
    b = broker()  # default 8 MiB Session buffer, smaller than one 20 MB result
    size = 20_000_000

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            turn = await s.start_turn(thread, "deltas=20000 seconds=3")
            for _ in range(3):
                assert len((await s.result("fake/big", {"bytes": size}))["data"]) == size
            completed = await s.turn_completed(thread, turn)
            assert completed["params"]["turn"]["status"] == "completed"

    run(main())
    assert "dropped" not in b.log()


def test_oversized_client_messages_are_refused_with_resource_exhausted(broker):
    b = broker()
    padding = "x" * (MAX_MESSAGE + 1024)

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as bystander:
            assert await bystander.result("thread/loaded/list")
            big = SessionClient(channel)
            await big.send({"id": 1, "method": "fake/echo", "params": {"p": padding}})
            assert await big.wait_end() == grpc.StatusCode.RESOURCE_EXHAUSTED, big.details
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(channel, "fake/echo", {"p": padding})
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await bystander.result("thread/loaded/list")
            assert await health(channel) == SERVING

    run(main())


def test_a_session_that_never_reads_is_dropped_without_stalling_others(broker):
    b = broker("--session-buffer", str(1 << 20))
    proc = psutil.Process(b.pid)

    async def main():
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, proc.memory_info().rss)
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        async with aio_channel(b) as channel, SessionClient(channel) as fast:
            stuck = SessionClient(channel, read=False)
            await stuck.send({"id": 1, "method": "turn/start", "params": {
                "threadId": "thread-stuck", "input": [{"type": "text", "text": "deltas=300000"}]}})
            thread = await fast.start_thread()
            turn = await fast.start_turn(thread, "deltas=3000")
            completed = await fast.turn_completed(thread, turn, timeout=60)
            assert completed["params"]["turn"]["status"] == "completed"

            st = await status_until(channel, lambda st: st.open_sessions == 1 and any(
                t.thread_id == "thread-stuck" for t in st.in_flight_turns), timeout=60)
            assert st.sessions[0].pending_requests == 0  # the fast Session
            stuck.start_reading()  # now read what made it out, then the status
            assert await stuck.wait_end(30) == grpc.StatusCode.RESOURCE_EXHAUSTED, stuck.details
            assert "Server overloaded" in (stuck.details or "")
            assert await fast.result("thread/loaded/list")
            assert await health(channel) == SERVING
        sampling = False
        await sampler
        assert peak < 200 << 20, f"broker RSS peaked at {peak >> 20} MB behind a stuck client"
        print(f"broker RSS peak {peak >> 20} MB")

    run(main())
    b.drain(force=True)  # the stuck Session's turn keeps running; end it
    assert b.wait_exit(30) == 0


def test_app_server_death_fails_pending_requests_at_once_and_exits_1(broker):
    b = broker()
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as turner, SessionClient(channel) as waiter:
            slow = await waiter.send_request("fake/slow", {"seconds": 30})
            slow_call = asyncio.ensure_future(call(channel, "fake/slow", {"seconds": 30}))
            await status_until(channel, lambda st: st.pending_requests == 2)
            thread = await turner.start_thread()
            start = time.monotonic()
            await turner.start_turn(thread, "deltas=50 crash=10")
            reply = await asyncio.wait_for(slow, 15)
            elapsed = time.monotonic() - start
            assert elapsed < 15, f"pending request failed only after {elapsed:.1f} s"
            message = reply["error"]["message"]
            assert "exited with status 3" in message and "crashing mid-turn" in message, reply
            call_reply = await slow_call
            assert "exited with status 3" in call_reply.error.message, call_reply
            assert "crashing mid-turn" in call_reply.error.message, call_reply
            for s in (turner, waiter):
                assert await s.wait_end(10) == grpc.StatusCode.UNAVAILABLE, s.details
                assert "exited with status 3" in (s.details or "")
            assert await asyncio.to_thread(b.wait_exit, 15) == 1

    run(main())
    assert not wait_gone([app], 5)


def test_requests_beyond_the_app_server_stdin_backlog_get_the_overload_error(broker):
    b = broker()
    padding = "x" * (30 << 20)

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            await s.send({"id": "hang", "method": "fake/hang", "params": {}})  # stops reading stdin
            for i in range(3):  # ~90 MB queued for a reader that no longer reads
                await s.send({"id": f"big-{i}", "method": "fake/echo", "params": {"p": padding}})
            refused = await s.request("thread/loaded/list")
            assert refused["error"] == {"code": -32001, "message": "Server overloaded; retry later."}
            reply = await call(channel, "thread/loaded/list", {})
            assert (reply.error.code, reply.error.message) == (-32001, "Server overloaded; retry later.")

    run(main())
    assert b.stop_now() == 0


def test_session_buffer_holds_one_big_message_beyond_its_limit_but_not_a_backlog():
    from proxy.session import Session

    dropped: list[Session] = []
    session = Session("unit", 1 << 20, dropped.append)
    session.push(b"b" * (5 << 20))  # one big result: allowed whatever its size
    for _ in range(1000):
        session.push(b"d" * 1000)  # ~1 MB of deltas behind it: still within the limit
    assert not dropped
    for _ in range(100):
        session.push(b"d" * 1000)
    assert dropped and all(d is session for d in dropped)  # a backlog beyond the limit, big message aside


def test_json_numbers_decode_and_encode_exactly_and_nan_is_not_json():
    from proxy import jsonrpc

    line = b'{"id": 7, "result": {"big": 1180591620717411303424, "neg": -9223372036854775809, "f": 0.1}}'
    fast = jsonrpc.loads_for_routing(line)
    assert fast["id"] == 7
    exact = jsonrpc.exact(line, fast)
    assert exact["result"] == {"big": 2**70, "neg": -(2**63) - 1, "f": 0.1}
    assert jsonrpc.loads(line.decode()) == exact
    assert jsonrpc.loads(jsonrpc.dumps(exact)) == exact
    assert jsonrpc.exact(b'{"id": 1}', {"id": 1}) == {"id": 1}
    numbers = "[1e400, -1e400, 1e-400, 1.0000000000000000000001, 123456789012345678901234567890.5, 0.1, -0.0, 2.5]"
    assert jsonrpc.dumps_text(jsonrpc.loads(numbers)) == numbers.replace(" ", "")
    for text in ("NaN", '{"a": Infinity}', "[-Infinity]"):
        with pytest.raises(jsonrpc.DecodeError):
            jsonrpc.loads(text)


@pytest.mark.parametrize("round_", range(3))
def test_calls_pending_when_the_app_server_is_killed_get_their_error_not_cancelled(broker, round_):
    """No Session open: the broker's stop has nothing to flush and runs at once. Every pending
    Call's reply, the app-server's exit, must still reach its caller before gRPC stops."""
    b = broker()
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel:
            calls = [asyncio.ensure_future(call(channel, "fake/slow", {"seconds": 30})) for _ in range(20)]
            await status_until(channel, lambda st: st.pending_requests == len(calls))
            app.kill()
            for reply in await asyncio.wait_for(asyncio.gather(*calls), 15):
                assert "killed by SIGKILL" in reply.error.message, reply
        assert await asyncio.to_thread(b.wait_exit, 15) == 1

    run(main())
