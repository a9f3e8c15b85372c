"""Graceful rotation: a broker draining itself past its own max age, or a mismatched one asked
to drain, is replaced by a new one spawned at once; its in-flight turn finishes normally, new
callers land on the new broker, and the old one exits by itself. Each rotation is recorded in
the workspace's history."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from lifecycle_support import World, health_watch_until, process, wait_exit, world_for

from lifecycle.ensure import BrokerSession
from lifecycle.errors import SessionClosed
from protos import broker_pb2

SHORT_AGE_HOURS = "0.002"  # 7.2 s: long enough to start a turn on a loaded machine
DRAINED_EXIT_BOUND = 5.0  # the design says a drained broker is gone within 1 s of its last turn


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def assert_rotated(world: World, old: BrokerSession, new: BrokerSession, verdict: str) -> None:
    assert new.verdict == verdict and not new.reused, new
    assert new.pid != old.pid and new.instance_id != old.instance_id
    entry = world.state().history()[-1]
    assert (entry.old_pid, entry.new_pid) == (old.pid, new.pid)
    assert (entry.old_instance, entry.new_instance) == (old.instance_id, new.instance_id)
    assert entry.reason.startswith(f"{verdict}:")


def test_broker_past_its_own_max_age_drains_itself_and_is_rotated_while_its_turn_finishes_on_it(
        world: World) -> None:
    old = world.ensure(world.env_with(CODEX_BROKER_MAX_AGE_HOURS=SHORT_AGE_HOURS))
    old_proc = process(old.pid)
    turn = world.turn(old.endpoint, "seconds=20 deltas=20")
    assert len(world.client(old.endpoint).status().in_flight_turns) == 1, "drained before the turn ran"
    health_watch_until(old.endpoint, health_pb2.HealthCheckResponse.NOT_SERVING)  # by its own max age

    new = world.ensure()  # the caller's default max age: only the broker's own made it drain

    assert_rotated(world, old, new, "draining")
    status = world.client(old.endpoint).status()
    assert status.state == broker_pb2.BROKER_STATE_DRAINING and "max age" in status.drain_reason
    assert [t.turn_id for t in status.in_flight_turns] == [turn.turn_id], "the turn did not survive the rotation"
    assert world.client(new.endpoint).status().max_age_hours == 6.0
    # New callers land on the new broker.
    again = world.ensure()
    assert again.reused and again.verdict == "live" and again.pid == new.pid
    # A new Session on the draining broker is refused: work goes to the new one.
    with world.client(old.endpoint).session() as refused, pytest.raises(SessionClosed, match="draining"):
        refused.request("thread/start", {}, timeout=10)

    completed = turn.result()
    assert completed["status"] == "completed"
    assert len(turn.deltas) == 20
    assert wait_exit(old_proc, DRAINED_EXIT_BOUND), "the drained broker did not exit after its last turn"
    assert not os.path.exists(os.path.dirname(old.endpoint.removeprefix("unix:"))), "its session dir was left"
    assert [p.pid for p in world.brokers()] == [new.pid]


def test_spawned_broker_gets_the_companion_max_age_only_when_ours_is_unset(world: World, tmp_path: Path) -> None:
    ours = world.ensure(world.env_with(CODEX_BROKER_MAX_AGE_HOURS="6", CODEX_COMPANION_BROKER_MAX_AGE_HOURS="2"))
    assert world.client(ours.endpoint).status().max_age_hours == 6.0, "ours must win over the companion's variable"
    other = tmp_path / "ws-companion"
    other.mkdir()

    companion = world.ensure(world.env_with(CODEX_COMPANION_BROKER_MAX_AGE_HOURS="2"), workspace=other)

    assert world.client(companion.endpoint).status().max_age_hours == 2.0
    record = world.record(other)
    assert record is not None and record.max_age_seconds == 2 * 3600.0


@pytest.mark.parametrize("what", ["app-server-command", "codex-home"])
def test_broker_spawned_with_another_configuration_is_rotated_gracefully(world: World, tmp_path: Path,
                                                                        what: str) -> None:
    old = world.ensure()
    old_proc = process(old.pid)
    turn = world.turn(old.endpoint, "seconds=3 deltas=10")
    if what == "app-server-command":
        env = world.env_with(CODEX_BROKER_APP_SERVER=world.fake_command("--dummy-extra"))
    else:
        other_home = tmp_path / "other-codex-home"
        other_home.mkdir()
        env = world.env_with(CODEX_HOME=str(other_home))

    new = world.ensure(env)

    assert_rotated(world, old, new, "mismatched")
    status = world.client(old.endpoint).status()
    assert status.state == broker_pb2.BROKER_STATE_DRAINING and len(status.in_flight_turns) == 1
    assert ("command" if what == "app-server-command" else "CODEX_HOME") in new.reason
    record = world.record()
    assert record is not None and record.pid == new.pid
    if what == "app-server-command":
        assert record.app_server_command[-1] == "--dummy-extra"
    else:
        assert record.codex_home == str(tmp_path / "other-codex-home")
    assert turn.result()["status"] == "completed" and len(turn.deltas) == 10
    assert wait_exit(old_proc, 15)
    # The same configuration again: reused.
    assert world.ensure(env).pid == new.pid

