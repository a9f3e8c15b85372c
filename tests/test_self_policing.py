"""A broker polices itself, however it was started: past its max age it drains itself (reason
"max age"; turns in flight finish; exit 0), and an app-server wedged without a break for
--exit-when-wedged seconds ends it (pending work failed with the reason, socket path gone,
app-server group killed, exit 1). A passing stall never adds up to a wedge. Status reports both
limits; the max age comes from the flag, else the two variables, else 6 hours."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import (
    NOT_SERVING,
    SERVING,
    SessionClient,
    aio_channel,
    fake_command,
    new_marker,
    next_status,
    run,
    run_serve,
    short_dir,
    status,
)

from protos import broker_pb2, broker_pb2_grpc

# Long enough to start a turn on a loaded machine, short enough to wait for: 7.2 s.
SHORT_AGE_HOURS = "0.002"
# Fast hang detection, so a wedge is reached within seconds of SIGSTOP.
FAST_PROBES = ("--probe-interval", "0.2", "--probe-timeout", "1")
AGE_VARIABLES = ("CODEX_BROKER_MAX_AGE_HOURS", "CODEX_COMPANION_BROKER_MAX_AGE_HOURS")


async def watch(channel: grpc.aio.Channel, first: int = SERVING):
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    await next_status(call, first, 20)
    return call


async def wait_exit(b, timeout: float = 60.0) -> int:
    return await asyncio.to_thread(b.wait_exit, timeout)


def no_age_env(**values: str) -> dict[str, str]:
    """The age variables unset (empty counts as unset), then ``values``."""
    return {**dict.fromkeys(AGE_VARIABLES, ""), **values}


# -- aged ------------------------------------------------------------------------------------
def test_a_broker_past_its_max_age_drains_itself_lets_its_turn_finish_and_exits_0(broker):
    b = broker("--max-age-hours", SHORT_AGE_HOURS)

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            health = await watch(channel)
            thread = await s.start_thread()
            turn = await s.start_turn(thread, "deltas=30 seconds=20")
            await s.until(lambda m: m.get("method") == "turn/started")
            assert (await status(channel)).state == broker_pb2.BROKER_STATE_SERVING, "drained before the turn ran"

            await next_status(health, NOT_SERVING, 60)  # by itself: nobody asked it to drain

            st = await status(channel)
            assert st.state == broker_pb2.BROKER_STATE_DRAINING
            assert "max age" in st.drain_reason, st.drain_reason
            assert [t.turn_id for t in st.in_flight_turns] == [turn]
            assert await asyncio.to_thread(os.path.exists, b.sock), "gRPC stays up until the stop"
            refused = SessionClient(channel)
            assert await refused.wait_end(10) == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (refused.details or "")
            completed = await s.turn_completed(thread, turn, timeout=60)
            assert completed["params"]["turn"]["status"] == "completed"
            assert len([m for m in s.messages if m.get("method") == "item/agentMessage/delta"]) == 30
            assert await wait_exit(b) == 0
            health.cancel()

    run(main())
    assert "drain started (max age 0.002 h reached)" in b.log()


def test_max_age_zero_is_never_and_is_reported(broker):
    b = broker("--max-age-hours", "0", "--exit-when-wedged", "0")
    st = b.status()
    assert st.HasField("max_age_hours") and st.max_age_hours == 0.0
    assert st.HasField("exit_when_wedged_seconds") and st.exit_when_wedged_seconds == 0.0
    assert st.state == broker_pb2.BROKER_STATE_SERVING


@pytest.mark.parametrize(("flags", "env", "hours"), [
    pytest.param(("--max-age-hours", "2.5"), no_age_env(CODEX_BROKER_MAX_AGE_HOURS="9"), 2.5, id="flag-wins"),
    pytest.param((), no_age_env(CODEX_BROKER_MAX_AGE_HOURS="3", CODEX_COMPANION_BROKER_MAX_AGE_HOURS="9"), 3.0,
                 id="own-variable"),
    pytest.param((), no_age_env(CODEX_COMPANION_BROKER_MAX_AGE_HOURS="4.5"), 4.5, id="companion-variable"),
    pytest.param((), no_age_env(), 6.0, id="default"),
])
def test_status_reports_the_max_age_from_the_flag_else_the_variables_else_6_hours(broker, flags, env, hours):
    st = broker(*flags, env=env).status()
    assert st.max_age_hours == pytest.approx(hours)
    assert st.exit_when_wedged_seconds == 30.0


def test_a_max_age_variable_that_is_not_hours_is_refused_with_exit_2():
    result = run_serve("--endpoint", f"unix:{short_dir()}/d/s.sock", "--app-server",
                       fake_command(marker=new_marker()), env={"CODEX_BROKER_MAX_AGE_HOURS": "six"})
    assert result.returncode == 2, result.stderr
    assert "CODEX_BROKER_MAX_AGE_HOURS='six' is not a valid age" in result.stderr


# -- wedged ----------------------------------------------------------------------------------
def test_a_broker_wedged_for_exit_when_wedged_fails_pending_work_stops_listening_kills_the_app_server_exits_1(
        broker):
    b = broker("--exit-when-wedged", "2", *FAST_PROBES)
    app = b.app_server
    assert b.status().exit_when_wedged_seconds == 2.0

    async def main():
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            await s.initialize()
            app.send_signal(signal.SIGSTOP)
            request = broker_pb2.CallRequest(method="thread/loaded/list", params_json=json.dumps({}))
            pending_call = asyncio.ensure_future(broker_pb2_grpc.AppServerStub(channel).Call(request, timeout=60))
            pending_session = asyncio.ensure_future(s.request("thread/loaded/list", {}, timeout=60))

            reply = await pending_call
            assert reply.WhichOneof("outcome") == "error", reply
            assert "wedged" in reply.error.message, reply.error
            answer = await pending_session
            assert "wedged" in answer["error"]["message"], answer
            assert await wait_exit(b) == 1

    run(main())
    assert psutil.wait_procs([app], timeout=10)[1] == [], "the wedged app-server was left running"
    assert not os.path.lexists(b.sock)
    log = b.log()
    assert "app-server wedged for" in log and "no longer listening" in log
    # The socket's path went before the app-server was stopped (nobody could connect meanwhile).
    assert log.index("no longer listening") < log.index("app-server stopped")


def test_stalls_each_shorter_than_exit_when_wedged_never_add_up_to_an_exit(broker):
    """Three stalls of about 1.5 s wedged each (4.5 s in all) against a 4 s limit: each answer
    after SIGCONT starts the count again, so the broker lives and serves."""
    b = broker("--exit-when-wedged", "4", *FAST_PROBES)
    app = b.app_server

    async def main():
        async with aio_channel(b) as channel:
            health = await watch(channel)
            for _ in range(3):
                app.send_signal(signal.SIGSTOP)
                await next_status(health, NOT_SERVING, 30)
                await asyncio.sleep(1.5)  # the stall's length: the fault being shaped, not a wait for an event
                app.send_signal(signal.SIGCONT)
                await next_status(health, SERVING, 30)
            assert b.proc.poll() is None, b.tail()
            assert (await status(channel)).state == broker_pb2.BROKER_STATE_SERVING
            health.cancel()

    run(main())
    assert "app-server wedged for" not in b.log()
