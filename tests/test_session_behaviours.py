"""One table of Session behaviours, run over both front ends: every test here runs once with
gRPC AppServer.Session clients and once with JSONL clients (and the mixed case, where one Session
of each kind share a thread). The rules are the hub's: ids rewritten and restored, per-thread
routing, order, the cached initialize, per-Session opt-outs, server requests fanned out with the
first answer winning, bad input answered while the Session stays open, lossless JSON."""
from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from harness import (
    WAIT,
    JsonlSession,
    SessionClient,
    aio_channel,
    jsonl_flags,
    jsonl_path,
    notifications,
    run,
    short_dir,
)

from protos import broker_pb2, broker_pb2_grpc

USER_INPUT = "item/tool/requestUserInput"
TRANSPORTS = ["grpc", "jsonl"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Served:
    """A broker with both front ends; ``client(kind)`` opens a Session over either."""

    def __init__(self, b: Any, path: str, transport: str):
        self.b = b
        self.path = path
        self.transport = transport

    @contextlib.asynccontextmanager
    async def client(self, kind: str | None = None) -> AsyncIterator[Any]:
        kind = kind or self.transport
        if kind == "jsonl":
            async with await JsonlSession.connect(self.path) as c:
                yield c
        else:
            async with aio_channel(self.b) as channel, SessionClient(channel) as c:
                yield c


@pytest.fixture
def served(broker, transport) -> Any:
    directory = short_dir()
    path = jsonl_path(directory)
    yield Served(broker(*jsonl_flags(path)), path, transport)
    shutil.rmtree(directory, ignore_errors=True)


def is_server_request(method: str) -> Callable[[Any], bool]:
    return lambda m: m.get("method") == method and "id" in m


def turn_kinds(messages: list[Any], turn_id: str) -> list[str]:
    out = []
    for m in messages:
        result = m.get("result")
        if isinstance(result, dict) and (result.get("turn") or {}).get("id") == turn_id:
            out.append("response")
            continue
        params = m.get("params") if "method" in m else None
        if not isinstance(params, dict):
            continue
        if params.get("turnId") == turn_id or (params.get("turn") or {}).get("id") == turn_id:
            out.append(m["method"])
    return out


def test_sessions_on_different_threads_see_only_their_own_turns_in_order(served):
    async def main():
        async with served.client() as a, served.client() as c:
            thread_a, thread_c = await asyncio.gather(a.start_thread(), c.start_thread())
            turn_a, turn_c = await asyncio.gather(a.start_turn(thread_a, "deltas=200"),
                                                  c.start_turn(thread_c, "deltas=200"))
            await asyncio.gather(a.turn_completed(thread_a, turn_a), c.turn_completed(thread_c, turn_c))
            for s, turn, other in ((a, turn_a, turn_c), (c, turn_c, turn_a)):
                assert turn_kinds(s.messages, turn) == ["response", "turn/started", "item/started",
                                                        *["item/agentMessage/delta"] * 200, "item/completed",
                                                        "turn/completed"]
                deltas = [m["params"]["delta"] for m in notifications(s.messages, "item/agentMessage/delta")]
                assert deltas == [f"w{i} " for i in range(200)]
                assert turn_kinds(s.messages, other) == []

    run(main())


def test_concurrent_requests_are_answered_under_their_own_ids(served):
    ids: list[Any] = [*range(1, 21), *(f"s-{i}" for i in range(10)), 0, -5, 2**70, "1"]

    async def client(n: int) -> None:
        async with served.client() as s:
            futures = [await s.send_request("fake/echo", {"n": n, "i": i}, id=req_id) for i, req_id in enumerate(ids)]
            replies = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
            for i, (req_id, reply) in enumerate(zip(ids, replies, strict=True)):
                assert type(reply["id"]) is type(req_id) and reply["id"] == req_id
                assert reply["result"] == {"params": {"n": n, "i": i}}
            assert len(s.messages) == len(ids)

    async def main():
        await asyncio.gather(*(client(n) for n in range(8)))

    run(main())


def test_initialize_is_answered_from_the_cache_once_per_session(served):
    async def main():
        async with served.client() as s, served.client() as fresh:
            reply = await s.initialize()
            assert reply["result"] == {"userAgent": "fake-codex-app-server/0.1"}
            again = await s.request("initialize", {"clientInfo": {"name": "again", "version": "0"}})
            assert again["error"] == {"code": -32600, "message": "Already initialized"}
            assert await fresh.start_thread()  # never initialized: works with the defaults

    run(main())


@pytest.mark.parametrize("quiet_kind", TRANSPORTS)
def test_opt_outs_apply_to_that_session_only(served, quiet_kind):
    async def main():
        async with served.client(quiet_kind) as quiet, served.client() as loud:
            await quiet.initialize(opt_out=["item/agentMessage/delta"], name="quiet")
            await loud.initialize(name="loud")
            thread = await quiet.start_thread()
            await loud.result("thread/read", {"threadId": thread})  # subscribes
            turn = await quiet.start_turn(thread, "deltas=30")
            await asyncio.gather(quiet.turn_completed(thread, turn), loud.turn_completed(thread, turn))
            assert notifications(quiet.messages, "item/agentMessage/delta") == []
            assert len(notifications(loud.messages, "item/agentMessage/delta")) == 30

    run(main())


@pytest.mark.parametrize("other_kind", TRANSPORTS)
def test_server_request_goes_to_every_subscriber_and_the_first_answer_wins(served, other_kind):
    async def main():
        async with served.client() as asker, served.client(other_kind) as other:
            thread = await asker.start_thread()
            await other.result("thread/read", {"threadId": thread})
            answer = await asker.send_request("fake/serverRequest", {"threadId": thread})
            to_asker = (await asker.until(is_server_request(USER_INPUT)))[-1]
            to_other = (await other.until(is_server_request(USER_INPUT)))[-1]
            await other.respond(to_other["id"], {"answers": {"q1": "from other"}})
            reply = await asyncio.wait_for(answer, WAIT)
            assert reply["result"]["response"]["result"] == {"answers": {"q1": "from other"}}
            await asker.respond(to_asker["id"], {"answers": {"q1": "too late"}})  # dropped by the broker
            stats = await asker.result("fake/stats")
            assert stats["unexpectedResponses"] == 0 and stats["serverResponses"] == 1, stats

    run(main())


def test_server_request_is_declined_when_its_only_subscriber_disconnects(served):
    async def main():
        async with aio_channel(served.b) as channel:
            stub = broker_pb2_grpc.AppServerStub(channel)
            async with served.client() as s:
                thread = await s.start_thread()
                pending = asyncio.ensure_future(stub.Call(broker_pb2.CallRequest(
                    method="fake/serverRequest", params_json=json.dumps({"threadId": thread})), timeout=WAIT))
                await s.until(is_server_request(USER_INPUT))
            response = json.loads((await pending).result_json)["response"]
            assert response["error"] == {"code": -32000, "message": "no client answered this request"}

    run(main())


@pytest.mark.parametrize("text, code, same_id", [("this is not json{", -32700, False), ("[1, 2]", -32600, False),
                                                 ('{"id": 9}', -32600, True), ('{"id": 9, "method": 5}', -32600, True)])
def test_bad_input_is_answered_and_the_session_stays_open(served, text, code, same_id):
    async def main():
        async with served.client() as s:
            await s.send(text)
            error = await s.next()
            assert error["error"]["code"] == code
            assert error["id"] == (9 if same_id else None)
            assert await s.result("fake/echo", {"still": "open"}) == {"params": {"still": "open"}}

    run(main())


def test_json_round_trips_losslessly(served):
    params = {"big": 2**80, "neg": -(2**70), "text": "héllo \u2028 \U0001f600", "nested": [[{"a": None}]]}

    async def main():
        async with served.client() as s:
            assert await s.result("fake/echo", params) == {"params": params}

    run(main())


@pytest.mark.parametrize("second_kind", TRANSPORTS)
def test_notifications_without_a_thread_go_to_every_session(served, second_kind):
    async def main():
        async with served.client() as a, served.client(second_kind) as c:
            await c.initialize()
            await a.result("fake/notify", {"count": 3})
            for s in (a, c):
                ticks = await s.until(lambda m: m.get("method") == "fake/tick" and m["params"]["i"] == 2)
                assert [m["params"]["i"] for m in notifications(ticks, "fake/tick")] == [0, 1, 2]

    run(main())
