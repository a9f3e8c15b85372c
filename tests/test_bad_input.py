"""Bad input never kills the broker: each bad message gets its own clear error, and after each
one the broker is still SERVING (a real Health Check), still the same process, and a fresh
Session still works.

The broker is started directly (``python -m proxy serve``) in front of the fake app-server."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any

import grpc
import pytest
from harness import CHANNEL_OPTIONS, BrokerProcess, SessionClient

from protos import broker_pb2, broker_pb2_grpc

MAX_MESSAGE = 64 << 20  # the broker's limit on one client message
NO_CLIENT = {"code": -32000, "message": "no client answered this request"}


def run(coro: Coroutine[Any, Any, Any], timeout: float = 90.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def still_serving(b: BrokerProcess, channel: grpc.aio.Channel) -> None:
    """The broker answers a real Health Check with SERVING, is the same process, and serves a
    request on a brand-new Session."""
    assert b.alive(), f"broker exited with {b.proc.returncode}:\n{b.tail()}"
    assert await asyncio.to_thread(b.health_name) == "SERVING"
    status = await asyncio.to_thread(b.status)
    assert status.pid == b.pid and status.state == broker_pb2.BROKER_STATE_SERVING
    fresh = SessionClient(channel)
    try:
        reply = await fresh.request("thread/loaded/list")
        assert "result" in reply, reply
    finally:
        await fresh.close()


async def call(channel: grpc.aio.Channel, method: str, params_json: str, timeout: float = 30
               ) -> broker_pb2.CallReply:
    request = broker_pb2.CallRequest(method=method, params_json=params_json)
    return await broker_pb2_grpc.AppServerStub(channel).Call(request, timeout=timeout)


async def one_error_then_ok(s: SessionClient, text: str) -> dict[str, Any]:
    """Sends ``text``, then a good request; returns the one error the bad text got (and checks
    that nothing else arrived in between, and that the Session is still open)."""
    before = len(s.messages)
    await s.send_text(text)
    req_id = await s.send_request("thread/loaded/list")
    ok = await s.response(req_id)
    assert "result" in ok, ok
    between = s.messages[before:s.messages.index(ok)]
    assert len(between) == 1, f"{text!r}: expected one error, got {between}"
    assert not s.ended
    return between[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("text", [
    "this is not json{",
    '{"id": 1, "method": "thread/loaded/list"',
    "{'id': 1}",
    "",
    "\ufeff{}",
    '{"id": "dup", "id": ',
])
def test_invalid_json_gets_a_parse_error_and_the_session_stays_open(served, text):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            error = await one_error_then_ok(s, text)
            assert error["id"] is None and error["error"]["code"] == -32700, error
            assert error["error"]["message"].startswith("Parse error"), error
            await s.close()
            await still_serving(b, channel)

    run(main())


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_and_get_a_parse_error(served, constant):
    """JSON has no NaN or Infinity (RFC 8259 section 6). The broker must refuse them like any
    other invalid JSON, not forward the request with the value silently turned into null."""
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            error = await one_error_then_ok(
                s, f'{{"id": "c-1", "method": "fake/echo", "params": {{"x": {constant}}}}}')
            assert error.get("error", {}).get("code") == -32700 and error["id"] is None, (
                f"{constant} was accepted as JSON and forwarded: {error}")
            await s.close()
            await still_serving(b, channel)

    run(main())


def test_numbers_reach_the_app_server_with_their_exact_value(served, tmp_path):
    """DESIGN section 3: JSON text is carried so that numbers stay exact. A number that does not
    fit a double (1e400) or has more digits than one holds must reach the app-server with the
    value the client wrote, not rounded, and never turned into null."""
    log = tmp_path / "fake-stdin.jsonl"
    b = served(env={"FAKE_LOG_REQUESTS": str(log)})
    numbers = ["1e400", "-1e400", "1.0000000000000000000001", "123456789012345678901234567890.5"]

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            await s.send_text('{"id": "n-1", "method": "fake/echo", "params": {"x": [' + ", ".join(numbers) + "]}}")
            await s.response("n-1")
            await s.close()
            await still_serving(b, channel)

    run(main())
    received = [json.loads(line, parse_float=Decimal) for line in log.read_bytes().splitlines()
                if b"fake/echo" in line]
    assert len(received) == 1, received
    got = received[0]["params"]["x"]
    assert got == [Decimal(n) for n in numbers], f"the app-server received {got}"


@pytest.mark.parametrize(("text", "kind"), [
    ("[1, 2, 3]", "a batch (array)"),
    ('[{"id": 1, "method": "fake/echo", "params": {"batched": true}}]', "a batch (array)"),
    ("42", "int"),
    ('"a string"', "str"),
    ("null", "NoneType"),
    ("true", "bool"),
])
def test_non_object_json_gets_one_invalid_request_with_null_id(served, tmp_path, text, kind):
    log = tmp_path / "fake-stdin.jsonl"
    b = served(env={"FAKE_LOG_REQUESTS": str(log)})

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            error = await one_error_then_ok(s, text)
            assert error["id"] is None and error["error"]["code"] == -32600, error
            assert kind in error["error"]["message"], error
            await s.close()
            await still_serving(b, channel)

    run(main())
    assert b"batched" not in log.read_bytes(), "a JSON-RPC batch was executed instead of refused"


@pytest.mark.parametrize(("text", "req_id"), [
    ('{"id": 7}', 7),
    ('{"id": "req-8", "params": {"threadId": "t"}}', "req-8"),
    ('{"id": 9, "method": null}', 9),
    ('{"id": 10, "method": ""}', 10),
    ('{"id": 11, "method": ["thread/loaded/list"]}', 11),
    ('{"jsonrpc": "2.0", "params": {}}', None),
])
def test_missing_method_gets_invalid_request_under_its_own_id(served, text, req_id):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            error = await one_error_then_ok(s, text)
            assert error["error"]["code"] == -32600, error
            assert "method" in error["error"]["message"], error
            assert error["id"] == req_id and type(error["id"]) is type(req_id), error
            await s.close()
            await still_serving(b, channel)

    run(main())


def test_70mb_client_message_is_refused_with_resource_exhausted_and_nothing_else_is_disturbed(served):
    b = served()
    big = json.dumps({"id": 1, "method": "fake/echo", "params": {"p": "x" * (70 << 20)}})
    assert len(big) > MAX_MESSAGE

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            bystander = SessionClient(channel)
            thread = (await bystander.request("thread/start", {}))["result"]["thread"]["id"]
            turn = await bystander.request("turn/start", {"threadId": thread, "input": "deltas=30 seconds=1.5"})
            assert "result" in turn, turn

            s = SessionClient(channel)
            await s.send_text(big)
            assert await s.wait_end() == grpc.StatusCode.RESOURCE_EXHAUSTED, s.details
            assert "larger than max" in (s.details or ""), s.details
            assert s.messages == []

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(channel, "fake/echo", json.dumps({"p": "x" * (70 << 20)}))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (info.value.details() or "")

            # The refused Session is gone from the broker's books; the bystander's turn ran on.
            await asyncio.to_thread(b.status_until, lambda st: st.open_sessions == 1,
                                    "the refused Session to be closed")
            done = await bystander.wait_message(
                lambda m: m.get("method") == "turn/completed" and m["params"]["threadId"] == thread)
            assert done["params"]["turn"]["status"] == "completed"
            deltas = [m for m in bystander.messages if m.get("method") == "item/agentMessage/delta"]
            assert len(deltas) == 30
            await bystander.close()
            await still_serving(b, channel)

    run(main())


def test_invalid_utf8_from_the_app_server_is_logged_and_skipped(served):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            reply = await s.request("fake/garbage", {"kind": "utf8"})
            assert reply["result"] == {"ok": True}, reply
            reply = await call(channel, "fake/garbage", json.dumps({"kind": "utf8"}))
            assert json.loads(reply.result_json) == {"ok": True}
            assert await s.request("thread/loaded/list")
            assert len(s.messages) == 2, f"something of the bad line reached the Session: {s.messages}"
            await s.close()
            await still_serving(b, channel)

    run(main())
    skipped = [line for line in b.log().splitlines() if "app-server line skipped" in line]
    assert len(skipped) == 2 and all("not JSON" in line for line in skipped), skipped


def test_unknown_method_error_from_the_app_server_passes_through(served):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            reply = await s.response(await s.send_request("no/such/method", {}, id="mine-1"))
            assert reply["id"] == "mine-1" and reply["error"]["code"] == -32601, reply
            assert "no/such/method" in reply["error"]["message"], reply
            answer = await call(channel, "no/such/method", "{}")
            assert answer.WhichOneof("outcome") == "error" and answer.error.code == -32601, answer
            # Bad Calls get their error from the broker itself.
            answer = await call(channel, "fake/echo", "{not json")
            assert answer.error.code == -32700, answer
            answer = await call(channel, "", "{}")
            assert answer.error.code == -32600 and "method" in answer.error.message, answer
            await s.close()
            await still_serving(b, channel)

    run(main())


def test_a_session_that_sends_nothing_stays_open_and_status_shows_it(served):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            opened = time.time()
            s = SessionClient(channel)
            st = await asyncio.to_thread(b.status_until, lambda st: st.open_sessions == 1, "the silent Session")
            session_id = st.sessions[0].session_id
            assert st.sessions[0].pending_requests == 0 and not st.sessions[0].half_closed
            # Two health probes later (the broker probes the app-server when nothing answered
            # for 1 s), the silent Session is still there and the broker still SERVING.
            await asyncio.to_thread(b.status_until, lambda st: st.last_probe_at > opened + 2.0,
                                    "two probe intervals", 20)
            assert not s.ended, (s.code, s.details)
            st = await asyncio.to_thread(b.status)
            assert [x.session_id for x in st.sessions] == [session_id]
            assert st.health == "SERVING" and not st.in_flight_turns and st.pending_requests == 0
            assert await asyncio.to_thread(b.health_name) == "SERVING"
            await s.close()
            await asyncio.to_thread(b.status_until, lambda st: st.open_sessions == 0, "the Session to close")
            await still_serving(b, channel)

    run(main())


def test_client_that_disconnects_mid_request_leaves_the_broker_serving(served):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            await s.send_request("fake/slow", {"seconds": 3})
            await asyncio.to_thread(b.status_until, lambda st: st.pending_requests == 1, "the pending request")
            await s.close()
            # The Session is gone at once; its request stays pending until the app-server answers.
            st = await asyncio.to_thread(b.status_until, lambda st: st.open_sessions == 0, "the Session to close")
            assert st.pending_requests == 1, st
            assert await asyncio.to_thread(b.health_name) == "SERVING"
            await asyncio.to_thread(b.status_until, lambda st: st.pending_requests == 0,
                                    "the late response to be dropped", 15)
            await still_serving(b, channel)

    run(main())
    assert "Traceback" not in b.log(), b.tail()


@pytest.mark.parametrize("scoped", [True, False], ids=["thread-scoped", "to-everyone"])
def test_client_that_disconnects_mid_server_request_gets_the_app_server_a_32000(served, scoped):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            params: dict[str, Any] = {}
            if scoped:
                thread = (await s.request("thread/start", {}))["result"]["thread"]["id"]
                params = {"threadId": thread}
            else:
                assert await s.request("thread/loaded/list")  # the Session is open on the broker
            # A Call asks the app-server to send a server request; it reaches only this Session.
            asking = asyncio.create_task(call(channel, "fake/serverRequest", json.dumps(params)))
            request = await s.wait_message(lambda m: m.get("method") == "item/tool/requestUserInput")
            assert "id" in request
            assert not asking.done()
            await s.close()  # gone without answering
            reply = await asyncio.wait_for(asking, 15)
            answer = json.loads(reply.result_json)["response"]
            assert answer["error"] == NO_CLIENT, answer
            stats = json.loads((await call(channel, "fake/stats", "{}")).result_json)
            assert stats["pendingServerRequests"] == 0 and stats["unexpectedResponses"] == 0, stats
            await still_serving(b, channel)

    run(main())


def test_answer_to_an_unknown_server_request_is_dropped_and_the_session_stays_open(served):
    b = served()

    async def main():
        async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
            s = SessionClient(channel)
            for msg in ({"id": 12345, "result": {"decision": "accept"}}, {"id": "nope", "error": {"code": 1}}):
                await s.send(msg)
            assert "result" in await s.request("thread/loaded/list")
            assert len(s.messages) == 1, s.messages
            stats = json.loads((await call(channel, "fake/stats", "{}")).result_json)
            assert stats["unexpectedResponses"] == 0, "the broker forwarded an answer nobody asked for"
            await s.close()
            await still_serving(b, channel)

    run(main())
