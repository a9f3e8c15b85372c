"""Sessions sharing one app-server: routing by thread, order, id mapping, the cached
initialize, per-Session opt-outs, server->client requests, half-close, lossless JSON."""
from __future__ import annotations

import asyncio
import json

import grpc
from harness import (
    WAIT,
    SessionClient,
    aio_channel,
    methods_in,
    notifications,
    read_request_log,
    run,
)

from protos import broker_pb2, broker_pb2_grpc

USER_INPUT = "item/tool/requestUserInput"


def thread_of(msg):
    params = msg.get("params") if isinstance(msg, dict) else None
    return params.get("threadId") if isinstance(params, dict) else None


def turn_messages(messages, turn_id):
    """The turn/start response and the turn's notifications, in the order received."""
    out = []
    for m in messages:
        result = m.get("result")
        if isinstance(result, dict) and isinstance(result.get("turn"), dict) and result["turn"].get("id") == turn_id:
            out.append(("response", m))
            continue
        params = m.get("params") if "method" in m else None
        if not isinstance(params, dict):
            continue
        if params.get("turnId") == turn_id or (params.get("turn") or {}).get("id") == turn_id:
            out.append((m["method"], m))
    return out


def assert_turn_in_order(messages, turn_id, deltas):
    kinds = [kind for kind, _ in turn_messages(messages, turn_id)]
    expected = ["response", "turn/started", "item/started", *["item/agentMessage/delta"] * deltas,
                "item/completed", "turn/completed"]
    assert kinds == expected, f"turn {turn_id}: got {kinds[:5]}...{kinds[-3:]} ({len(kinds)} messages)"
    texts = [m["params"]["delta"] for kind, m in turn_messages(messages, turn_id) if kind == "item/agentMessage/delta"]
    assert texts == [f"w{i} " for i in range(deltas)]


def test_two_sessions_on_different_threads_see_only_their_own_turns_in_order(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as a, SessionClient(channel) as c:
            thread_a, thread_c = await asyncio.gather(a.start_thread(), c.start_thread())
            assert thread_a != thread_c
            turns = []
            for text, deltas in (("deltas=200 seconds=0.5", 200), ("deltas=300 chunk=1", 300)):
                turn_a, turn_c = await asyncio.gather(a.start_turn(thread_a, text), c.start_turn(thread_c, text))
                done = await asyncio.gather(a.turn_completed(thread_a, turn_a), c.turn_completed(thread_c, turn_c))
                assert [d["params"]["turn"]["status"] for d in done] == ["completed", "completed"]
                turns.append((turn_a, turn_c, deltas))
            for client, own in ((a, thread_a), (c, thread_c)):
                foreign = [m for m in client.messages if thread_of(m) not in (None, own)]
                assert not foreign, f"{len(foreign)} messages of another thread, e.g. {foreign[0]}"
                assert len(notifications(client.messages, "turn/completed")) == 2
            for turn_a, turn_c, deltas in turns:
                assert_turn_in_order(a.messages, turn_a, deltas)
                assert_turn_in_order(c.messages, turn_c, deltas)

    run(main())


def request_ids(n: int) -> list:
    """50 distinct ids of every kind a client may use: ints (incl. 0, negative, 64-bit) and strings."""
    ids: list = []
    for i in range(n):
        ids.append([i, -i - 1, 2**62 + 1 + i, f"req-{i}", f"ид-✓-{i}-𝄞", str(i), 2**63 - 1 - i][i % 7])
    assert len({(type(x), x) for x in ids}) == n
    return ids


def test_16_sessions_x_50_concurrent_requests_all_answered_under_their_own_ids(broker):
    b = broker()
    ids = request_ids(50)

    async def client(n: int) -> None:
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            futures = [await s.send_request("fake/echo", {"n": n, "i": i}, id=req_id) for i, req_id in enumerate(ids)]
            replies = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
            for i, (req_id, reply) in enumerate(zip(ids, replies, strict=True)):
                assert "error" not in reply, reply
                assert type(reply["id"]) is type(req_id) and reply["id"] == req_id
                assert reply["result"] == {"params": {"n": n, "i": i}}
            assert len(s.messages) == 50, "a Session got messages that were not its own"

    async def main():
        await asyncio.gather(*(client(n) for n in range(16)))

    run(main())


def test_initialize_is_answered_from_the_cache_and_is_optional(broker, tmp_path):
    log = tmp_path / "requests.jsonl"
    b = broker(env={"FAKE_LOG_REQUESTS": str(log)})

    async def main():
        async with aio_channel(b) as channel:
            async with SessionClient(channel) as s1, SessionClient(channel) as s2, SessionClient(channel) as s3:
                for s in (s1, s2):
                    reply = await s.initialize()
                    assert reply["result"] == {"userAgent": "fake-codex-app-server/0.1"}
                again = await s1.request("initialize", {"clientInfo": {"name": "again", "version": "0"}})
                assert again["error"]["code"] == -32600
                assert again["error"]["message"] == "Already initialized"
                assert await s3.start_thread()  # never initialized: works with the defaults
                for s in (s1, s2):  # after the clients' `initialized` (same stream, in order)
                    assert "data" in await s.result("thread/loaded/list")

    run(main())
    methods = methods_in(read_request_log(log))
    assert methods.count("initialize") == 1, methods
    assert methods.count("initialized") == 1, methods  # the broker's own, none from clients


def test_opt_out_notification_methods_apply_to_that_session_only(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as quiet, SessionClient(channel) as loud:
            await quiet.initialize(opt_out=["item/agentMessage/delta"], name="quiet")
            await loud.initialize(name="loud")
            thread = await quiet.start_thread()
            await loud.result("thread/read", {"threadId": thread})  # subscribes
            turn = await quiet.start_turn(thread, "deltas=50")
            await asyncio.gather(quiet.turn_completed(thread, turn), loud.turn_completed(thread, turn))
            assert notifications(quiet.messages, "item/agentMessage/delta") == []
            assert len(notifications(loud.messages, "item/agentMessage/delta")) == 50
            for s in (quiet, loud):
                assert len(notifications(s.messages, "item/completed")) == 1
            sessions = {info.client_name: info for info in b.status().sessions}
            assert list(sessions["quiet"].opt_out_notification_methods) == ["item/agentMessage/delta"]
            assert list(sessions["loud"].opt_out_notification_methods) == []

    run(main())


def is_server_request(method):
    return lambda m: m.get("method") == method and "id" in m


def test_server_request_goes_to_every_subscriber_and_the_first_answer_wins(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as asker, SessionClient(channel) as other:
            thread = await asker.start_thread()
            await other.result("thread/read", {"threadId": thread})
            answer = await asker.send_request("fake/serverRequest", {"threadId": thread})
            to_asker = (await asker.until(is_server_request(USER_INPUT)))[-1]
            to_other = (await other.until(is_server_request(USER_INPUT)))[-1]
            assert to_asker["params"]["threadId"] == to_other["params"]["threadId"] == thread
            await other.respond(to_other["id"], {"answers": {"q1": "from other"}})
            reply = await asyncio.wait_for(answer, WAIT)
            assert reply["result"]["response"]["result"] == {"answers": {"q1": "from other"}}
            await asker.respond(to_asker["id"], {"answers": {"q1": "too late"}})  # dropped by the broker
            stats = await asker.result("fake/stats")
            assert stats["unexpectedResponses"] == 0, stats
            assert stats["serverRequests"] == stats["serverResponses"] == 1, stats

    run(main())


async def call(channel, method, params):
    stub = broker_pb2_grpc.AppServerStub(channel)
    return await stub.Call(broker_pb2.CallRequest(method=method, params_json=json.dumps(params)), timeout=WAIT)


def declined(reply) -> bool:
    response = json.loads(reply.result_json)["response"]
    return response.get("error") == {"code": -32000, "message": "no client answered this request"}


def test_server_request_with_no_subscriber_is_declined_with_32000(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as bystander:
            await bystander.start_thread()
            reply = await call(channel, "fake/serverRequest", {"threadId": "thread-nobody-listens"})
            assert declined(reply), reply
            assert not [m for m in bystander.messages if "id" in m and "method" in m]

    run(main())


def test_server_request_is_declined_when_its_only_subscriber_disconnects(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel:
            s = SessionClient(channel)
            thread = await s.start_thread()
            pending = asyncio.ensure_future(call(channel, "fake/serverRequest", {"threadId": thread}))
            await s.until(is_server_request(USER_INPUT))
            await s.close()  # gone without answering
            assert declined(await pending)

    run(main())


def test_server_request_is_declined_when_its_only_subscriber_half_closes(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            pending = asyncio.ensure_future(call(channel, "fake/serverRequest", {"threadId": thread}))
            await s.until(is_server_request(USER_INPUT))
            await s.done_writing()
            assert declined(await pending)
            assert await s.wait_end() == grpc.StatusCode.OK

    run(main())


def test_half_closed_session_receives_until_turn_completed_then_ends_ok(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            thread = await s.start_thread()
            await s.send_request("turn/start", {"threadId": thread,
                                                "input": [{"type": "text", "text": "deltas=20 seconds=1"}]})
            await s.done_writing()
            assert await s.wait_end() == grpc.StatusCode.OK, s.details
            assert s.messages[-1]["method"] == "turn/completed", s.messages[-3:]
            assert s.messages[-1]["params"]["turn"]["status"] == "completed"
            turn_id = s.messages[-1]["params"]["turn"]["id"]
            assert_turn_in_order(s.messages, turn_id, 20)

    run(main())


LOSSLESS = {
    "i64max": 2**63 - 1,
    "i64min": -(2**63),
    "u64max": 2**64 - 1,
    "big": 2**70,
    "negbig": -(2**80) + 1,
    "text": "héllo ✓ 𝄞 中文 \u0000 \"quoted\" \\ \n",
    "floats": [0.1, 1e300, 2.5e-308, 1.7976931348623157e308, 5e-324, -1.5, [1.5, {"pi": 3.141592653589793}]],
    "nested": {"a": [{"b": [None, True, False, "", {}, []]}]},
}


def test_session_round_trips_json_losslessly(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            for req_id in (2**70, 2**63 - 1, "ид-𝄞"):
                reply = await s.request("fake/echo", LOSSLESS, id=req_id)
                assert reply["id"] == req_id and type(reply["id"]) is type(req_id)
                assert reply["result"]["params"] == LOSSLESS
            reply = await call(channel, "fake/echo", LOSSLESS)
            assert json.loads(reply.result_json)["params"] == LOSSLESS

    run(main())


def test_failed_thread_request_still_subscribes_its_session(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as watcher, SessionClient(channel) as runner:
            failed = await watcher.request("thread/read", {"threadId": "thread-later"})
            assert failed["error"]["code"] == -32600  # unknown thread, yet now subscribed
            turn = await runner.start_turn("thread-later", "deltas=3")
            completed = await watcher.turn_completed("thread-later", turn)
            assert completed["params"]["turn"]["status"] == "completed"
            assert len(notifications(watcher.messages, "item/agentMessage/delta")) == 3

    run(main())


def test_server_request_without_thread_goes_to_every_session(broker):
    b = broker()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as a, SessionClient(channel) as c:
            await a.start_thread()
            answer = await a.send_request("fake/serverRequest", {})
            to_a = (await a.until(is_server_request(USER_INPUT)))[-1]
            to_c = (await c.until(is_server_request(USER_INPUT)))[-1]
            await a.respond(to_a["id"], {"answers": {}})
            assert (await asyncio.wait_for(answer, WAIT))["result"]["response"]["result"] == {"answers": {}}
            await c.respond(to_c["id"], {"answers": {"late": True}})
            assert (await c.result("fake/stats"))["unexpectedResponses"] == 0

    run(main())


def test_notifications_without_thread_go_to_every_session_with_thread_to_subscribers(broker):
    b = broker()

    def ticks(s):
        return [m["params"] for m in notifications(s.messages, "fake/tick")]

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as a, SessionClient(channel) as c:
            thread = await a.start_thread()
            await c.result("thread/loaded/list")  # c is open before the ticks
            await a.result("fake/notify", {"count": 5})
            await a.result("fake/notify", {"count": 3, "threadId": thread})
            await a.until(lambda m: m.get("params") == {"i": 2, "threadId": thread})
            await c.result("fake/notify", {"count": 1, "threadId": "thread-end-marker"})  # subscribes c
            await c.until(lambda m: m.get("params") == {"i": 0, "threadId": "thread-end-marker"})
            assert ticks(a) == [{"i": i} for i in range(5)] + [{"i": i, "threadId": thread} for i in range(3)]
            assert ticks(c) == [{"i": i} for i in range(5)] + [{"i": 0, "threadId": "thread-end-marker"}]

    run(main())
