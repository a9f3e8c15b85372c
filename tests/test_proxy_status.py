"""Broker.Status: identity, Sessions, in-flight turns and pending requests, as they come and go."""
from __future__ import annotations

import asyncio
import json
import os
import time

import grpc
import psutil
from harness import SessionClient, aio_channel, run, status, status_until

from protos import broker_pb2, broker_pb2_grpc


def test_status_reports_identity_sessions_turns_and_pending_requests(broker):
    b = broker("--instance-id", "test-instance-0001")
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            idle = await status(channel)
            assert idle.instance_id == "test-instance-0001"
            assert idle.pid == b.pid
            assert idle.app_server_pid == app.pid and idle.app_server_alive
            assert idle.app_server_create_time_ms == int(app.create_time() * 1000)
            assert idle.state == broker_pb2.BROKER_STATE_SERVING and idle.health == "SERVING"
            assert idle.endpoint == b.endpoint and idle.cwd == os.getcwd()
            assert 0 < idle.started_at <= time.time()
            assert idle.version

            await s.initialize(name="status-client")
            thread = await s.start_thread()
            turn = await s.start_turn(thread, "deltas=10 seconds=2")
            slow = await s.send_request("fake/slow", {"seconds": 1.5})
            stub = broker_pb2_grpc.AppServerStub(channel)
            slow_call = asyncio.ensure_future(stub.Call(broker_pb2.CallRequest(
                method="fake/slow", params_json=json.dumps({"seconds": 1.5})), timeout=30))
            busy = await status_until(channel, lambda st: st.pending_requests == 2)
            assert [(t.thread_id, t.turn_id) for t in busy.in_flight_turns] == [(thread, turn)]
            assert busy.open_sessions == 1
            (info,) = busy.sessions
            assert info.client_name == "status-client"
            assert info.pending_requests == 1 and info.subscribed_threads == 1 and not info.half_closed
            assert busy.in_flight_turns[0].session_id == info.session_id
            assert busy.in_flight_turns[0].started_at <= time.time()

            assert "result" in await asyncio.wait_for(slow, 30)
            assert (await slow_call).WhichOneof("outcome") == "result_json"
            assert (await status(channel)).pending_requests == 0
            await s.turn_completed(thread, turn)
            assert list((await status(channel)).in_flight_turns) == []
            await s.done_writing()
            assert await s.wait_end() == grpc.StatusCode.OK
            after = await status(channel)
            assert after.open_sessions == 0 and list(after.sessions) == []

    run(main())
    assert psutil.pid_exists(app.pid)
