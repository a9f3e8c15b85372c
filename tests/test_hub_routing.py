"""The hub's routing of app-server output, line by line as the broker's reader hands it over
(a chunk's lines at a time): each Session gets exactly the messages of the threads it follows,
in the app-server's order, with turn tracking, bad lines and blank lines handled on the way.
No processes here: the app-server's side is the ``send`` callback and lines fed by hand."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from protos import broker_pb2
from proxy import jsonrpc
from proxy.hub import Hub
from proxy.session import EndReason, Session


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Harness:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.raw_sent: list[bytes] = []
        self.hub = Hub(send=self._send, stdin_backlog=lambda: 0,
                       session_buffer_bytes=8 << 20, on_change=lambda: None)
        self.hub.init_result = {"userAgent": "test"}

    def _send(self, raw: bytes) -> None:
        self.raw_sent.append(raw)
        self.sent.append(json.loads(raw))

    def from_client(self, session: Session, msg: Any) -> None:
        """What a front end does with one client message (small: read on the loop)."""
        self.hub.route(session, jsonrpc.read_client_message(json.dumps(msg).encode()))

    def session_on(self, thread_id: str) -> Session:
        """A Session, initialized, that started ``thread_id`` (so it follows it)."""
        session = self.hub.open_session()
        self.from_client(session, {"id": 1, "method": "initialize", "params": {}})
        self.from_client(session, {"id": 2, "method": "thread/start", "params": {}})
        proxy_id = self.sent[-1]["id"]
        self.hub.from_app_server_lines([line({"id": proxy_id, "result": {"thread": {"id": thread_id}}})])
        drain(session)
        return session


def drain(session: Session) -> list[dict[str, Any]]:
    """Everything queued for the Session, decoded from its ServerFrames."""
    out: list[dict[str, Any]] = []

    async def take() -> None:
        while session._queue:
            frame = await session.next_frame()
            assert frame is not None
            out.extend(json.loads(m) for m in broker_pb2.ServerFrame.FromString(frame).messages)

    asyncio.run(take())
    return out


def note(method: str, thread_id: str, **params: Any) -> bytes:
    return line({"method": method, "params": {"threadId": thread_id, **params}})


async def frame_messages(session: Session) -> list[str]:
    """What the Session's gRPC frames carry, one message each, until its queue is empty."""
    out: list[str] = []
    while session._queue:
        frame = await session.next_frame()
        assert frame is not None
        out.extend(broker_pb2.ServerFrame.FromString(frame).messages)
    return out


def test_interleaved_threads_reach_only_their_sessions_in_order_with_turns_tracked():
    h = Harness()
    a, b = h.session_on("thr-a"), h.session_on("thr-b")
    lines = [note("turn/started", "thr-a", turn={"id": "t1", "status": "inProgress"}),
             note("item/agentMessage/delta", "thr-a", delta="a0"),
             note("item/agentMessage/delta", "thr-b", delta="b0"),
             note("item/agentMessage/delta", "thr-a", delta="a1"),
             b"",
             b"   ",
             note("item/agentMessage/delta", "thr-a", delta="a2"),
             b"{not json",
             note("item/agentMessage/delta", "thr-b", delta="b1"),
             note("item/agentMessage/delta", "thr-a", delta="a3"),
             note("turn/completed", "thr-a", turn={"id": "t1", "status": "completed"}),
             note("item/agentMessage/delta", "thr-a", delta="a4"),
             line({"method": "account/updated", "params": {}}),  # no thread: every Session
             note("item/agentMessage/delta", "thr-unknown", delta="x")]
    h.hub.from_app_server_lines(lines[:5])
    assert ("thr-a", "t1") in h.hub.turns  # turn/started was tracked in the middle of a chunk
    h.hub.from_app_server_lines(lines[5:])
    got_a, got_b = drain(a), drain(b)
    assert [(m["method"], m["params"].get("delta")) for m in got_a] == [
        ("turn/started", None), ("item/agentMessage/delta", "a0"), ("item/agentMessage/delta", "a1"),
        ("item/agentMessage/delta", "a2"), ("item/agentMessage/delta", "a3"), ("turn/completed", None),
        ("item/agentMessage/delta", "a4"), ("account/updated", None)]
    assert [(m["method"], m["params"].get("delta")) for m in got_b] == [
        ("item/agentMessage/delta", "b0"), ("item/agentMessage/delta", "b1"), ("account/updated", None)]
    assert ("thr-a", "t1") not in h.hub.turns


def test_opted_out_methods_are_skipped_and_lines_pass_through_byte_for_byte():
    h = Harness()
    quiet, loud = h.session_on("thr-q"), h.session_on("thr-l")
    quiet.opt_out = frozenset({"item/agentMessage/delta"})
    raw = b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-l","delta":"\\u00e9 1.0e0 "}}'
    h.hub.from_app_server_lines([note("item/agentMessage/delta", "thr-q", delta="q0"),
                                 note("item/reasoning/delta", "thr-q", delta="r0"), raw])

    async def frame_of(session: Session) -> bytes:
        frame = await session.next_frame()
        assert frame is not None
        return frame

    assert [m["method"] for m in drain(quiet)] == ["item/reasoning/delta"]
    (message,) = broker_pb2.ServerFrame.FromString(asyncio.run(frame_of(loud))).messages
    assert message.encode() == raw  # not re-encoded: escapes and number spelling kept


def test_a_session_past_its_buffer_limit_is_dropped_and_the_other_keeps_its_stream():
    h = Harness()
    slow, other = h.session_on("thr-s"), h.session_on("thr-o")
    slow.limit_bytes = 4096  # the other keeps the 8 MiB default
    lines = []
    for i in range(200):
        lines.append(note("item/agentMessage/delta", "thr-s", delta=f"s{i}"))
        lines.append(note("item/agentMessage/delta", "thr-o", delta=f"o{i}"))
    for start in range(0, len(lines), 50):  # chunks, as the reader hands them over
        h.hub.from_app_server_lines(lines[start:start + 50])
    assert slow.ending is not None and slow.ending.reason is EndReason.SLOW_CLIENT  # dropped for falling behind
    assert [m["params"]["delta"] for m in drain(other)] == [f"o{i}" for i in range(200)]


@pytest.mark.parametrize("arrival", ["line by line", "in one chunk with the deltas around it"])
def test_a_big_response_amid_deltas_is_relayed_in_order_under_the_clients_id_with_every_number_exact(
        arrival, monkeypatch):
    """A result of more than 1 MiB is routed from its envelope (only its routing fields are
    decoded, never the whole of it): it reaches its requester between the deltas around it,
    under the client's own id, its numbers as the app-server wrote them."""
    h = Harness()
    from_envelope: list[int] = []
    route_envelope = h.hub._route_envelope
    monkeypatch.setattr(h.hub, "_route_envelope", lambda line: (from_envelope.append(len(line)),
                                                                route_envelope(line)))
    s = h.session_on("thr-big")
    h.from_client(s, {"id": "mine", "method": "thread/read", "params": {"threadId": "thr-big"}})
    proxy_id = h.sent[-1]["id"]
    numbers = ",".join(f"1{i:028d}.5e-400" for i in range(60_000))  # wider than 64 bits, finer than a double
    big = (b'{"id":%d,"result":{"thread":{"id":"thr-new"},"x":[' % proxy_id) + numbers.encode() + b"]}}"
    assert len(big) > 1 << 20
    lines = [note("item/agentMessage/delta", "thr-big", delta="before"), big,
             note("item/agentMessage/delta", "thr-big", delta="after")]
    if arrival == "line by line":
        for one in lines:
            h.hub.from_app_server_chunk(one)
    else:
        h.hub.from_app_server_chunk(b"\n".join(lines))
    assert from_envelope == [len(big)]

    before, relayed, after = asyncio.run(frame_messages(s))
    assert json.loads(before)["params"]["delta"] == "before" and json.loads(after)["params"]["delta"] == "after"
    assert relayed == '{"id":"mine","result":{"thread":{"id":"thr-new"},"x":[' + numbers + "]}}"
    assert "thr-new" in s.threads  # the result's thread id was read from the envelope


def test_a_big_server_request_is_relayed_and_the_answer_goes_back_under_the_app_servers_own_id():
    h = Harness()
    s = h.session_on("thr-ask")
    padding = "y" * (1 << 20)
    app_id = "123456789012345678901234567890"  # the app-server's own id, wider than 64 bits
    h.hub.from_app_server_lines([b'{"id":' + app_id.encode() + b',"method":"item/tool/requestUserInput",'
                                 b'"params":{"threadId":"thr-ask","pad":"' + padding.encode() + b'"}}'])
    (asked,) = drain(s)
    assert asked["params"]["pad"] == padding and asked["id"] != int(app_id)
    answer = b'{"id": ' + str(asked["id"]).encode() + b',\n "result": {"answers": {"q1": 1.00000000000000000001}}}'
    h.hub.route(s, jsonrpc.read_client_message(answer))  # pretty-printed, as a client may write it
    assert h.raw_sent[-1] == b'{"id":' + app_id.encode() + b',"result":{"answers":{"q1":1.00000000000000000001}}}'


def test_an_answer_that_fails_to_encode_settles_the_server_request_with_a_decline(monkeypatch):
    h = Harness()
    s = h.session_on("thr-enc")
    h.hub.from_app_server_lines([b'{"id":41,"method":"item/tool/requestUserInput","params":{"threadId":"thr-enc"}}'])
    (asked,) = drain(s)
    encode = jsonrpc.encode

    def failing(members: Any) -> bytes:
        if "result" in members:
            raise TypeError("cannot encode this answer")
        return encode(members)

    monkeypatch.setattr(jsonrpc, "encode", failing)
    h.from_client(s, {"id": asked["id"], "result": {"answers": {}}})
    assert h.sent[-1] == {"id": 41, "error": {"code": -32000, "message": (
        "the client's answer could not be relayed: it could not be encoded (cannot encode this answer)")}}
    assert not h.hub.server_requests and not s.server_requests


# -- answers: the unary fast path (a response that begins with its id) and the general one --------
NUMBER = "1.0000000000000000000000001e-400"  # no float holds it: its text must pass as written


def answer_layouts(proxy_id: int) -> list[bytes]:
    """One answer, as codex writes it (id first, compact) and as other writers could."""
    result = '{"thread":{"id":"thr-new"},"n":' + NUMBER + '}'
    return [b'{"id":%d,"result":%s}' % (proxy_id, result.encode()),
            b'{"result":%s,"id":%d}' % (result.encode(), proxy_id),
            b'{"id": %d, "result": %s}' % (proxy_id, result.encode()),
            b'{"id":%d,"result":%s} ' % (proxy_id, result.encode())]


@pytest.mark.parametrize("layout", range(4))
@pytest.mark.parametrize("client_id", ['"req-\\u00e9"', "9007199254740993"])
def test_an_answer_reaches_its_session_under_the_clients_own_id_text_with_its_values_exact(layout, client_id):
    h = Harness()
    session = h.hub.open_session()
    h.hub.route_line(session, b'{"id":%s,"method":"thread/start","params":{}}' % client_id.encode())
    proxy_id = h.sent[-1]["id"]
    h.hub.from_app_server_lines([answer_layouts(proxy_id)[layout]])
    (relayed,) = session.take_batch()
    assert relayed.startswith(b'{"id":' + client_id.encode() + b",") or relayed.endswith(
        b',"id":' + client_id.encode() + b"}")
    assert NUMBER.encode() in relayed and b"\n" not in relayed
    assert json.loads(relayed)["result"]["thread"] == {"id": "thr-new"}
    assert h.hub.pending_work == 0 and not session.pending
    # The result handed the Session a thread: it follows it now.
    h.hub.from_app_server_lines([note("item/agentMessage/delta", "thr-new", delta="x")])
    assert json.loads(session.take_batch()[0])["params"]["delta"] == "x"


def test_an_error_answer_in_codexs_layout_is_relayed_and_counted_as_an_error():
    h = Harness()
    session = h.hub.open_session()
    h.hub.route_line(session, b'{"id":5,"method":"account/read","params":{}}')
    proxy_id = h.sent[-1]["id"]
    h.hub.from_app_server_lines([b'{"id":%d,"error":{"code":-32603,"message":"no"}}' % proxy_id])
    assert session.take_batch() == [b'{"id":5,"error":{"code":-32603,"message":"no"}}']
    assert h.hub.counts.requests[("session", "account/read", "error")] == 1


def test_a_turn_starting_answer_in_codexs_layout_still_begins_the_turn():
    h = Harness()
    session = h.session_on("thr-a")
    h.from_client(session, {"id": 3, "method": "turn/start", "params": {"threadId": "thr-a", "input": []}})
    proxy_id = h.sent[-1]["id"]
    h.hub.from_app_server_lines([b'{"id":%d,"result":{"turn":{"id":"t9","status":"inProgress"}}}' % proxy_id])
    assert ("thr-a", "t9") in h.hub.turns and session.turns == {("thr-a", "t9")}
    assert drain(session) == [{"id": 3, "result": {"turn": {"id": "t9", "status": "inProgress"}}}]


def test_an_answer_to_a_session_that_half_closed_ends_it_once_its_work_is_done():
    h = Harness()
    session = h.hub.open_session()
    h.hub.route_line(session, b'{"id":1,"method":"account/read","params":{}}')
    proxy_id = h.sent[-1]["id"]
    h.hub.half_close(session)
    assert session.open
    h.hub.from_app_server_lines([b'{"id":%d,"result":{}}' % proxy_id])
    assert session.take_batch() == [b'{"id":1,"result":{}}']
    assert session.ending is not None and session.ending.reason is EndReason.OK


# -- a turn's chunk of notifications: queued whole, or line by line, with the same result -----------
def _delta(thread_id: str, i: int, **extra: Any) -> bytes:
    return note("item/agentMessage/delta", thread_id, turnId="t1", itemId="m1", delta=f"w{i} ", **extra)


CHUNKS: dict[str, list[bytes]] = {
    "all deltas of one thread": [_delta("thr-a", i) for i in range(12)],
    # One follower may opt out of one kind and not the other: then line by line.
    "two kinds of delta": [note("item/agentMessage/delta" if i % 3 else "item/reasoning/textDelta", "thr-a",
                                turnId="t1", itemId="m1", delta=f"w{i} ") for i in range(12)],
    "non-ASCII deltas": [_delta("thr-a", i, text="é—😀") for i in range(12)],
    "a line not UTF-8": [*(_delta("thr-a", i) for i in range(6)), _delta("thr-a", 6).replace(b"w6 ", b"w6 \xff"),
                         *(_delta("thr-a", i) for i in range(7, 12))],
    "a line not JSON": [*(_delta("thr-a", i) for i in range(6)), b"{not json",
                        *(_delta("thr-a", i) for i in range(7, 12))],
    "a blank line": [*(_delta("thr-a", i) for i in range(6)), b"", *(_delta("thr-a", i) for i in range(7, 12))],
    "two values on one line": [*(_delta("thr-a", i) for i in range(6)), _delta("thr-a", 6) + b"," + _delta("thr-a", 7),
                               *(_delta("thr-a", i) for i in range(8, 12))],
    # Each line wrong on its own, the whole a valid array of as many values as lines: a string that
    # runs over the comma between two lines, and a line that holds two values.
    "lines that are one value only when joined": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a"},"x":"', b'"}',
        _delta("thr-a", 6) + b"," + _delta("thr-a", 7),
        *(_delta("thr-a", i) for i in range(8, 12))],
    # The same over lines joined by newlines: a value whose line ends between two of its
    # members (whitespace there is allowed), and a line that holds two values.
    "a value over two lines": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a"},', b'"x":1}',
        _delta("thr-a", 6) + b" " + _delta("thr-a", 7),
        *(_delta("thr-a", i) for i in range(8, 12))],
    "a value over two lines, nothing else amiss": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a"},', b'"x":1}',
        *(_delta("thr-a", i) for i in range(8, 12))],
    "a value over two lines, the break before a comma": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a"}', b',"x":1}',
        _delta("thr-a", 6) + _delta("thr-a", 7),
        *(_delta("thr-a", i) for i in range(8, 12))],
    "a line with spaces around its value": [*(_delta("thr-a", i) for i in range(6)), b" " + _delta("thr-a", 6) + b"\t",
                                            *(_delta("thr-a", i) for i in range(7, 12))],
    "lines ending in a carriage return": [_delta("thr-a", i) + b"\r" for i in range(12)],
    "a line of whitespace": [*(_delta("thr-a", i) for i in range(6)), b" \t ",
                             *(_delta("thr-a", i) for i in range(7, 12))],
    "another thread's delta": [*(_delta("thr-a", i) for i in range(6)), _delta("thr-b", 6),
                               *(_delta("thr-a", i) for i in range(7, 12))],
    "a turn's end among them": [*(_delta("thr-a", i) for i in range(6)),
                                note("turn/completed", "thr-a", turn={"id": "t1", "status": "completed"}),
                                *(_delta("thr-a", i) for i in range(7, 12))],
    "a server request among them": [*(_delta("thr-a", i) for i in range(6)),
                                    line({"id": 70, "method": "item/commandExecution/requestApproval",
                                          "params": {"threadId": "thr-a", "turnId": "t1", "itemId": "c1"}}),
                                    *(_delta("thr-a", i) for i in range(7, 12))],
    "an item that is not an object's params": [*(_delta("thr-a", i) for i in range(6)),
                                               line({"method": "item/agentMessage/delta", "params": [1, 2]}),
                                               *(_delta("thr-a", i) for i in range(7, 12))],
    "a threadId that is not a string": [*(_delta("thr-a", i) for i in range(6)),
                                        line({"method": "item/agentMessage/delta", "params": {"threadId": 7}}),
                                        *(_delta("thr-a", i) for i in range(7, 12))],
    # A key given twice: the last one counts (as orjson reads it on the general route).
    "a delta that names its method twice, the last a turn's end": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a","turn":{"id":"t1","status":"completed"}},'
        b'"method":"turn/completed"}',
        *(_delta("thr-a", i) for i in range(7, 12))],
    "a delta that names its thread twice, the last another's": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a","threadId":"thr-b"}}',
        *(_delta("thr-a", i) for i in range(7, 12))],
    "a delta with an id of null (a request)": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a"},"id":null}',
        *(_delta("thr-a", i) for i in range(7, 12))],
    "a delta without params": [*(_delta("thr-a", i) for i in range(6)), b'{"method":"item/agentMessage/delta"}',
                               *(_delta("thr-a", i) for i in range(7, 12))],
    "a delta whose params are null": [*(_delta("thr-a", i) for i in range(6)),
                                      b'{"method":"item/agentMessage/delta","params":null}',
                                      *(_delta("thr-a", i) for i in range(7, 12))],
    # Read in one pass only where no bracket is in the chunk: with brackets (in the text, or
    # crafted: a value over two lines inside nested arrays, made whole by the brackets put
    # around each line, and a line of two values joined as two such arrays), the passes above.
    "deltas with brackets in their text": [_delta("thr-a", i, text="a[1],[2] ]") for i in range(12)],
    "a value over two lines inside nested arrays, and two values joined by brackets": [
        *(_delta("thr-a", i) for i in range(6)),
        b'{"method":"item/agentMessage/delta","params":{"threadId":"thr-a"},"x":[[1', b'2]]}',
        _delta("thr-a", 6) + b"],[" + _delta("thr-a", 7),
        *(_delta("thr-a", i) for i in range(8, 12))],
    # The first line names the thread and the method the rest are matched against.
    "the first line another thread's": [_delta("thr-b", 0), *(_delta("thr-a", i) for i in range(1, 12))],
    "the first line not JSON": [b"{not json", *(_delta("thr-a", i) for i in range(1, 12))],
    "the first line of another kind": [note("item/reasoning/textDelta", "thr-a", turnId="t1", itemId="r1",
                                            delta="r0 "), *(_delta("thr-a", i) for i in range(1, 12))],
    "only turn ends, all alike (a method the hub tracks)": [
        note("turn/completed", "thr-a", turn={"id": "t1", "status": "completed", "n": i}) for i in range(12)],
    "no thread at all (to everyone)": [line({"method": "account/updated", "params": {"n": i}}) for i in range(12)],
    "a thread nobody follows": [_delta("thr-z", i) for i in range(12)],
}


def _world(followers: int, opt_out: bool) -> tuple[Harness, list[Session]]:
    h = Harness()
    sessions = [h.session_on("thr-a") for _ in range(followers)] + [h.session_on("thr-b")]
    if opt_out:
        sessions[0].opt_out = frozenset({"item/agentMessage/delta"})
    h.hub._begin_turn("thr-a", "t1", sessions[0])
    return h, sessions


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("followers, opt_out", [(1, False), (2, False), (1, True), (2, True)])
@pytest.mark.parametrize("front_end", ["gRPC", "JSON lines"])
def test_a_chunk_of_lines_routes_exactly_as_its_lines_one_by_one(chunk, followers, opt_out, front_end):
    """The chunk as the app-server's reader hands it over (its lines joined by newlines), and
    the same lines one at a time: the same messages to the same Sessions, as a gRPC frame
    carries them (one message each) and as the JSON-lines front end writes them (the same
    bytes), the same tracking and the same counts."""
    whole, by_line = _world(followers, opt_out), _world(followers, opt_out)
    whole[0].hub.from_app_server_chunk(b"\n".join(CHUNKS[chunk]))
    for one in CHUNKS[chunk]:
        by_line[0].hub.from_app_server_lines([one])
    for a, b in zip(whole[1], by_line[1], strict=True):
        if front_end == "gRPC":
            assert asyncio.run(frame_messages(a)) == asyncio.run(frame_messages(b))
        else:
            assert b"\n".join(a.take_batch()) == b"\n".join(b.take_batch())
    assert whole[0].hub.turns.keys() == by_line[0].hub.turns.keys()
    assert whole[0].hub.server_requests.keys() == by_line[0].hub.server_requests.keys()
    assert dataclasses.asdict(whole[0].hub.counts) == dataclasses.asdict(by_line[0].hub.counts)
