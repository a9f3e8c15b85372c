"""Failures are reported, never hung on: a broker that cannot start is stopped and named with
the tail of its log; a client following a turn gets SessionClosed within seconds when the broker
or the app-server dies under it, or when ensure replaces a broker whose app-server is wedged."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from lifecycle_support import World, health_watch_until, process, wait_exit, world_for

from lifecycle import identity
from lifecycle.errors import SessionClosed, SpawnError

CLIENT_ERROR_BOUND = 5.0  # the design says "within a second"; a generous margin for a loaded machine
WAIT_FOR_REPLACEMENT = 15.0  # ensure's probes and Drain, then the drained broker's own wedge rule


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


# -- a broker that cannot start --------------------------------------------------------------
def missing_command(world: World) -> str:
    return f"/nonexistent/{world.marker}/codex-app-server"


def test_a_missing_app_server_command_raises_spawn_error_naming_it_with_the_log_tail(world: World) -> None:
    missing = missing_command(world)
    with pytest.raises(SpawnError) as caught:
        world.ensure(world.env_with(CODEX_BROKER_APP_SERVER=f"{missing} app-server"))

    message = str(caught.value)
    assert missing in caught.value.cause, message
    assert caught.value.log_tail and missing in caught.value.log_tail
    assert "--- last lines of" in message and caught.value.log_tail.splitlines()[-1] in message
    assert world.brokers() == []
    assert not world.state().record_path.exists(), "a broker that never started was recorded"
    assert os.listdir(world.runtime) == [], "the failed broker's session directory was left"


def test_cli_ensure_with_a_missing_app_server_prints_one_clear_line_and_exits_1(world: World) -> None:
    missing = missing_command(world)
    result = world.cli("ensure", env=world.env_with(CODEX_BROKER_APP_SERVER=missing))

    assert result.returncode == 1, result
    first = result.stderr.splitlines()[0]
    assert first.startswith("codex-broker ensure: broker failed to start:") and missing in first, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert world.brokers() == []
    assert not world.state().record_path.exists()


# -- a client following a turn when something dies --------------------------------------------
def test_a_turn_follower_gets_session_closed_quickly_when_the_broker_is_sigkilled(world: World) -> None:
    broker = world.ensure()
    record = world.record()
    assert record is not None and record.app_server_pid
    fake = process(record.app_server_pid)
    turn = world.turn(broker.endpoint, "seconds=20 deltas=200")
    turn.wait_first_delta()

    killed_at = time.monotonic()
    assert identity.signal_verified(broker.pid, record.create_time, signal.SIGKILL)
    outcome = turn.outcome(timeout=30)

    assert isinstance(outcome, SessionClosed), outcome
    assert turn.ended_at is not None and turn.ended_at - killed_at < CLIENT_ERROR_BOUND
    assert wait_exit(fake, 10), "the app-server outlived its SIGKILLed broker"
    # Later requests on that Session fail at once too, rather than waiting.
    with pytest.raises(SessionClosed):
        turn.session.request("thread/loaded/list", {}, timeout=30)
    replacement = world.ensure()
    assert replacement.verdict == "dead" and replacement.pid != broker.pid


def test_a_turn_follower_gets_session_closed_naming_the_exit_status_when_the_app_server_crashes(
        world: World) -> None:
    broker = world.ensure()
    broker_proc = process(broker.pid)
    turn = world.turn(broker.endpoint, "seconds=3 deltas=30 crash=5")

    outcome = turn.outcome(timeout=30)

    assert isinstance(outcome, SessionClosed), outcome
    assert "exited with status 3" in str(outcome), outcome
    assert len(turn.deltas) == 5
    assert turn.ended_at is not None and turn.ended_at - turn.last_message_at < CLIENT_ERROR_BOUND
    assert wait_exit(broker_proc, 15), "the broker did not exit after its app-server died"
    assert "stopped exit_code=1" in Path(broker.log_file).read_text(), "the broker should exit with status 1"
    replacement = world.ensure()
    assert replacement.verdict == "dead" and replacement.pid != broker.pid


def test_a_turn_follower_on_a_wedged_app_server_gets_session_closed_once_ensure_replaces_it(
        world: World) -> None:
    """ensure drains the unhealthy broker without force and spawns a new one; the old broker's
    own wedge rule (a draining broker whose app-server is wedged stops) ends the Session."""
    broker = world.ensure()
    broker_proc = process(broker.pid)
    turn = world.turn(broker.endpoint, "hang=1 deltas=5")
    health_watch_until(broker.endpoint, health_pb2.HealthCheckResponse.NOT_SERVING)

    replaced_at = time.monotonic()
    new = world.ensure()

    assert new.verdict == "unhealthy" and new.pid != broker.pid, new
    assert isinstance(turn.outcome(timeout=30), SessionClosed)
    assert turn.ended_at is not None and turn.ended_at - replaced_at < WAIT_FOR_REPLACEMENT
    assert wait_exit(broker_proc, 10)
