"""The JSONL front end: framing, end of input, overflow, broker/shutdown and draining, Status,
and a companion-like client's whole life (connect-only check, initialize, thread and turn,
broker/shutdown, SIGTERM to the process group)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat

import pytest
from harness import (
    WAIT,
    JsonlSession,
    SessionClient,
    aio_channel,
    connect_only,
    fake_command,
    jsonl_flags,
    jsonl_path,
    new_marker,
    run,
    run_serve,
    short_dir,
    status,
    status_until,
    wait_for,
)

from protos import broker_pb2


@pytest.fixture
def jb(broker):
    """Factory: a broker serving JSONL at ``<a fresh dir>/broker.sock`` too; returns (broker, path)."""
    dirs = []

    def start(*flags, **kw):
        directory = short_dir()
        dirs.append(directory)
        path = jsonl_path(directory)
        return broker(*jsonl_flags(path), *flags, **kw), path

    yield start
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def test_jsonl_session_initializes_from_the_cache_and_runs_a_turn(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c:
            reply = await c.initialize()
            assert "userAgent" in reply["result"]
            thread = await c.start_thread()
            turn = await c.start_turn(thread, "deltas=5")
            await c.turn_completed(thread, turn)
            assert not any(m.get("error") for m in c.messages)

    run(main())


# -- framing ----------------------------------------------------------------------------
def test_crlf_lines_are_read_and_blank_lines_ignored(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c:
            await c.send_bytes(b"\n\r\n   \n\t\r\n")
            await c.send_bytes(b'{"id": 7, "method": "fake/echo", "params": {"x": 1}}\r\n')
            await c.send_bytes(b'\n{"id": 8, "method": "fake/echo", "params": {"y": 2}}\n\n')
            first = await c.next()
            second = await c.next()
            assert first == {"id": 7, "result": {"params": {"x": 1}}}
            assert second == {"id": 8, "result": {"params": {"y": 2}}}
            assert len(c.messages) == 2  # the blank lines got nothing

    run(main())


@pytest.mark.parametrize("text, code", [(b"this is not json{", -32700), (b'{"id": 1, "x": ', -32700),
                                        (b"[1, 2]", -32600), (b'"a string"', -32600), (b"\xff\xfe{}", -32700)])
def test_bad_line_gets_one_error_with_null_id_and_the_connection_stays_open(jb, text, code):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c:
            await c.send_bytes(text + b"\n")
            error = await c.next()
            assert error["id"] is None and error["error"]["code"] == code, error
            assert await c.result("fake/echo", {"ok": True}) == {"params": {"ok": True}}
            assert len(c.messages) == 2

    run(main())


def test_line_over_64_mib_is_skipped_with_one_invalid_request_and_the_connection_stays_open(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c:
            big = b'{"id": 1, "method": "fake/echo", "params": {"s": "' + b"x" * (64 << 20) + b'"}}\n'
            await c.send_bytes(big)
            await c.send_bytes(b'{"id": 2, "method": "fake/echo", "params": {"after": true}}\n')
            error = await c.next()
            assert error["id"] is None and error["error"]["code"] == -32600, error
            assert "line longer than" in error["error"]["message"]
            assert await c.next() == {"id": 2, "result": {"params": {"after": True}}}
            assert len(c.messages) == 2  # the big line's own id got nothing
        assert b.health() == 1

    run(main())


def test_http2_preface_from_a_grpc_client_ends_the_connection_quietly(jb):
    b, path = jb()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(path)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data == b""  # closed, and nothing written: not even an error line
    assert b.status().state == broker_pb2.BROKER_STATE_SERVING


def test_connect_and_close_at_once_is_harmless(jb):
    b, path = jb()
    for _ in range(20):
        assert connect_only(path) == b""
    st = b.status()
    assert st.state == broker_pb2.BROKER_STATE_SERVING and st.open_sessions == 0

    async def main():
        async with await JsonlSession.connect(path) as c:
            await c.initialize()
            assert await c.result("fake/echo", {"n": 1}) == {"params": {"n": 1}}

    run(main())


def test_half_close_with_a_turn_running_closes_the_connection_at_once_and_the_turn_keeps_running(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c, aio_channel(b) as channel:
            await c.initialize()
            thread = await c.start_thread()
            turn = await c.start_turn(thread, "deltas=5 seconds=300")
            slow = await c.send_request("fake/slow", {"seconds": 300})
            await c.done_writing()
            assert await c.wait_end() == "closed"
            assert isinstance(slow.exception(), AssertionError)  # dropped, never answered
            st = await status_until(channel, lambda st: st.open_sessions == 0)
            assert [(t.thread_id, t.turn_id) for t in st.in_flight_turns] == [(thread, turn)]
            assert st.state == broker_pb2.BROKER_STATE_SERVING

    run(main())


def test_client_that_stops_reading_gets_one_overloaded_line_at_a_message_boundary_then_close(jb):
    b, path = jb("--session-buffer", "65536")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(WAIT)
        s.connect(path)
        for i in range(6):
            s.sendall(json.dumps({"id": i, "method": "fake/big", "params": {"bytes": 2_000_000}}).encode() + b"\n")
        wait_for(lambda: b.status().open_sessions == 0, what="the Session to be dropped while not reading")
        data = b""
        while chunk := s.recv(1 << 20):  # to the end: the broker closed
            data += chunk
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.split(b"\n")[:-1]]
    assert lines[-1] == {"id": None, "error": {"code": -32001, "message": "Server overloaded; retry later."}}
    answered = lines[:-1]
    assert len(answered) < 6 and all(m["result"]["data"] == "x" * 2_000_000 for m in answered)
    assert b.status().state == broker_pb2.BROKER_STATE_SERVING


# -- broker/shutdown and draining ----------------------------------------------------------
DRAINING_JSONL = {"code": -32001, "message": "Server is draining; retry after reconnecting",
                  "data": {"reason": "serverShuttingDown"}}


def test_broker_shutdown_is_answered_at_once_and_drains_turns_complete_then_exit_0(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as worker, await JsonlSession.connect(path) as other, \
                aio_channel(b) as channel:
            await worker.initialize()
            await other.initialize()
            thread = await worker.start_thread()
            turn = await worker.start_turn(thread, "deltas=20 seconds=2")
            async with await JsonlSession.connect(path) as stopper:
                reply = await stopper.request("broker/shutdown", {}, id=1)
                assert reply == {"id": 1, "result": {}}
            st = await status(channel)
            assert st.state == broker_pb2.BROKER_STATE_DRAINING
            assert not await asyncio.to_thread(os.path.lexists, path)  # the next check spawns a broker
            with pytest.raises(OSError):
                connect_only(path)
            # New work on a JSONL connection still open: -32001, the companion's cue to go direct.
            refused = await other.request("thread/start", {"cwd": "/tmp"})
            assert refused["error"] == DRAINING_JSONL
            # A second broker/shutdown is one drain request: answered, the deadline unchanged.
            again = await other.request("broker/shutdown", {})
            assert again["result"] == {}
            assert (await status(channel)).drain_deadline == st.drain_deadline
            completed = await worker.turn_completed(thread, turn)
            assert completed["params"]["turn"]["status"] == "completed"
            await worker.close()
            await other.close()
        assert await asyncio.to_thread(b.wait_exit) == 0

    run(main())


def test_grpc_new_work_while_draining_keeps_32600_while_jsonl_gets_32001(jb):
    b, path = jb()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as g, await JsonlSession.connect(path) as j:
            await g.initialize()
            await j.initialize()
            thread = await g.start_thread()
            await g.start_turn(thread, "deltas=5 seconds=300")  # holds the drain open
            b.drain(600)
            g_reply = await g.request("thread/start", {"cwd": "/tmp"})
            j_reply = await j.request("thread/start", {"cwd": "/tmp"})
            assert g_reply["error"]["code"] == -32600
            assert j_reply["error"] == DRAINING_JSONL
            assert await j.result("fake/echo", {"reads": "still served"}) == {"params": {"reads": "still served"}}

    run(main())


def test_broker_shutdown_never_shortens_a_drain_under_way(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c, aio_channel(b) as channel:
            await c.initialize()
            thread = await c.start_thread()
            await c.start_turn(thread, "deltas=5 seconds=300")
            b.drain(86400)
            before = (await status(channel)).drain_deadline
            assert (await c.request("broker/shutdown", {}))["result"] == {}
            st = await status(channel)
            assert st.drain_deadline == before and st.state == broker_pb2.BROKER_STATE_DRAINING

    run(main())


def test_any_drain_closes_the_jsonl_listener_while_grpc_still_reports_draining(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c:
            await c.initialize()
            thread = await c.start_thread()
            await c.start_turn(thread, "deltas=5 seconds=300")  # holds the drain open
            os.kill(b.pid, signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: not os.path.lexists(path), what="the JSONL path removed")
            assert b.status().state == broker_pb2.BROKER_STATE_DRAINING
            assert b.health() == 2  # NOT_SERVING, from the gRPC endpoint that stays up
            # The open connection keeps being served.
            assert await c.result("fake/echo", {"k": 1}) == {"params": {"k": 1}}

    run(main())


# -- Status, paths ---------------------------------------------------------------------------
def test_status_counts_jsonl_sessions_and_names_each_sessions_transport(jb):
    b, path = jb()

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as g, await JsonlSession.connect(path) as j:
            await g.initialize(name="grpc-client")
            await j.initialize(name="jsonl-client", opt_out=["item/agentMessage/delta"])
            st = await status(channel)
            assert st.open_sessions == 2
            by_name = {s.client_name: s for s in st.sessions}
            assert by_name["grpc-client"].transport == "grpc"
            assert by_name["jsonl-client"].transport == "jsonl"
            assert list(by_name["jsonl-client"].opt_out_notification_methods) == ["item/agentMessage/delta"]

    run(main())


def test_jsonl_socket_is_created_0600_and_removed_at_exit(jb):
    b, path = jb()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b.drain(5)
    assert b.wait_exit() == 0
    assert not os.path.lexists(path)


def test_a_jsonl_path_that_accepts_connections_is_refused_with_exit_2(tmp_path):
    directory = short_dir()
    try:
        path = jsonl_path(directory)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen()
            proc = run_serve("--endpoint", f"unix:{directory}/g/s.sock", *jsonl_flags(path),
                             "--app-server", fake_command(marker=new_marker()))
        assert proc.returncode == 2, proc.stderr
        assert "already in use" in proc.stderr
        assert not os.path.exists(f"{directory}/g")  # nothing left behind
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_stale_jsonl_socket_is_replaced(broker):
    directory = short_dir()
    try:
        path = jsonl_path(directory)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(path)  # bound, never listening: what a killed broker leaves
        broker(*jsonl_flags(path))

        async def main():
            async with await JsonlSession.connect(path) as c:
                await c.initialize()
                assert await c.result("fake/echo", {"fresh": True}) == {"params": {"fresh": True}}

        run(main())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_app_server_exit_answers_pending_work_ends_jsonl_sessions_with_one_line_and_removes_the_path(jb):
    b, path = jb()

    async def main():
        async with await JsonlSession.connect(path) as c:
            await c.initialize()
            slow = await c.send_request("fake/slow", {"seconds": 300})
            await c.send({"id": "bye", "method": "fake/exit", "params": {"code": 3}})
            reply = await asyncio.wait_for(slow, WAIT)
            assert reply["error"]["code"] == -32002
            assert await c.wait_end() == "closed"
            last = c.messages[-1]
            assert last["id"] is None and last["error"]["code"] == -32002, last

    run(main())
    assert b.wait_exit() == 1
    assert not os.path.lexists(path)


@pytest.mark.parametrize("jsonl", ["same", "tcp:127.0.0.1:0", "relative-but-no-dir/x/broker.sock"])
def test_a_bad_jsonl_endpoint_is_refused_with_exit_2(jsonl):
    directory = short_dir()
    try:
        grpc_sock = f"{directory}/g/s.sock"
        endpoint = f"unix:{grpc_sock}" if jsonl == "same" else jsonl if jsonl.startswith("tcp:") else \
            f"unix:{directory}/{jsonl}"
        proc = run_serve("--endpoint", f"unix:{grpc_sock}", "--jsonl-endpoint", endpoint,
                         "--app-server", fake_command(marker=new_marker()))
        assert proc.returncode == 2, proc.stderr
        assert "codex-broker serve:" in proc.stderr
        assert not os.path.exists(f"{directory}/g")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
