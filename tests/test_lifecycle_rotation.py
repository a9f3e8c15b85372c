"""Graceful rotation: an aged or mismatched broker is asked to drain while a new one is spawned
at once; its in-flight turn finishes normally, new callers land on the new broker, and the old
one exits by itself. Each rotation is recorded in the workspace's history."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_support import World, process, wait_exit, world_for

from lifecycle.ensure import BrokerSession
from lifecycle.errors import SessionClosed
from protos import broker_pb2

TINY_AGE_HOURS = "0.0003"  # ~1.1 s
TINY_AGE_SECONDS = float(TINY_AGE_HOURS) * 3600
DRAINED_EXIT_BOUND = 5.0  # the design says a drained broker is gone within 1 s of its last turn


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def wait_older_than_tiny_age(session: BrokerSession) -> None:
    """A real clock condition: the broker's age (from its own start time) passes the max age."""
    remaining = session.started_at + TINY_AGE_SECONDS + 0.2 - time.time()
    if remaining > 0:
        time.sleep(remaining)


def assert_rotated(world: World, old: BrokerSession, new: BrokerSession, verdict: str) -> None:
    assert new.verdict == verdict and not new.reused, new
    assert new.pid != old.pid and new.instance_id != old.instance_id
    entry = world.state().history()[-1]
    assert (entry.old_pid, entry.new_pid) == (old.pid, new.pid)
    assert (entry.old_instance, entry.new_instance) == (old.instance_id, new.instance_id)
    assert entry.reason.startswith(f"{verdict}:")


def test_aged_broker_is_rotated_while_its_turn_finishes_on_it(world: World) -> None:
    old = world.ensure()
    old_proc = process(old.pid)
    turn = world.turn(old.endpoint, "seconds=6 deltas=20")
    wait_older_than_tiny_age(old)
    assert len(world.client(old.endpoint).status().in_flight_turns) == 1

    new = world.ensure(world.env_with(CODEX_BROKER_MAX_AGE_HOURS=TINY_AGE_HOURS))

    assert_rotated(world, old, new, "aged")
    status = world.client(old.endpoint).status()
    assert status.state == broker_pb2.BROKER_STATE_DRAINING
    assert [t.turn_id for t in status.in_flight_turns] == [turn.turn_id], "the turn did not survive the rotation"
    # New callers (with the default max age) land on the new broker.
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


def test_companion_max_age_variable_is_honoured_when_ours_is_unset(world: World) -> None:
    old = world.ensure()
    old_proc = process(old.pid)
    wait_older_than_tiny_age(old)
    young = world.ensure(world.env_with(CODEX_BROKER_MAX_AGE_HOURS="6",
                                        CODEX_COMPANION_BROKER_MAX_AGE_HOURS=TINY_AGE_HOURS))
    assert young.reused and young.pid == old.pid, "ours must win over the companion's variable"

    new = world.ensure(world.env_with(CODEX_COMPANION_BROKER_MAX_AGE_HOURS=TINY_AGE_HOURS))

    assert_rotated(world, old, new, "aged")
    assert wait_exit(old_proc, 15), "the aged broker did not drain and exit"


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

