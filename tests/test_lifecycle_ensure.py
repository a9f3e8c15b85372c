"""ensure_broker against real brokers and the fake app-server: reuse, one broker under
concurrency, and replacement of dead, recycled, wedged and unhealthy brokers, never signalling a
process whose identity is not verified.

Each test runs in its own World (state dir, runtime dir, marker); its teardown stops every broker
the test caused and fails the test if any broker or fake app-server is left running."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from grpc_health.v1 import health_pb2
from lifecycle_support import World, health_watch_until, process, wait_exit, world_for

from lifecycle import identity
from lifecycle.client import BrokerClient
from lifecycle.ensure import BrokerSession


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def serving(session: BrokerSession) -> bool:
    with BrokerClient(session.endpoint) as client:
        return client.health() == "SERVING"


def assert_replaced(world: World, old: BrokerSession, new: BrokerSession) -> None:
    assert new.pid != old.pid and new.instance_id != old.instance_id and new.endpoint != old.endpoint
    assert not new.reused
    assert serving(new)
    record = world.record()
    assert record is not None and record.instance_id == new.instance_id and record.pid == new.pid
    assert [p.pid for p in world.brokers()] == [new.pid], "more than one broker is running"


# -- reuse and concurrency --------------------------------------------------------------------
def test_ensure_twice_reuses_the_same_live_broker(world: World) -> None:
    first = world.ensure()
    second = world.ensure()

    assert first.verdict == "none" and not first.reused
    assert second.verdict == "live" and second.reused
    assert (second.pid, second.endpoint, second.instance_id) == (first.pid, first.endpoint, first.instance_id)
    assert serving(second)
    assert [p.pid for p in world.brokers()] == [first.pid]
    assert len(world.fakes()) == 1


def test_sixteen_concurrent_cli_ensures_start_exactly_one_broker(world: World) -> None:
    procs = [world.cli_popen("ensure", "--json") for _ in range(16)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))

    assert len({(o["pid"], o["endpoint"], o["instance_id"]) for o in outputs}) == 1, outputs
    assert sorted(o["reused"] for o in outputs) == [False] + [True] * 15
    assert [p.pid for p in world.brokers()] == [outputs[0]["pid"]]
    assert len(world.fakes()) == 1
    record = world.record()
    assert record is not None and record.pid == outputs[0]["pid"]


# -- a recorded pid that is not (or no longer) our broker -------------------------------------
def _stranger_record(world: World, pid: int, create_time: float) -> None:
    """A broker.json naming ``pid``: its endpoint in a directory where nothing listens."""
    session_dir = os.path.join(world.runtime, "nobody")
    record = {"endpoint": f"unix:{session_dir}/s.sock", "pid": pid, "create_time": create_time,
              "instance_id": str(uuid.uuid4()), "started_at": time.time(), "session_dir": session_dir,
              "log_file": os.path.join(world.state_dir, "nothing.log"), "version": "0",
              "app_server_command": ["sleep", "60"], "codex_home": str(world.codex_home),
              "cwd": str(world.workspace)}
    world.state().record_path.write_text(json.dumps(record))


@pytest.mark.parametrize("how", ["other-create-time", "real-create-time-nothing-listening"])
def test_a_recorded_pid_now_owned_by_an_unrelated_process_is_never_signalled(world: World, how: str) -> None:
    stranger = world.stranger()
    created = identity.process_create_time(stranger.pid)
    assert created is not None
    # A recycled pid: the create time differs. Or a pid that really is that process, but it is not
    # a broker (nothing listens on the recorded endpoint and its command line is not a broker's).
    _stranger_record(world, stranger.pid, created - 1000.0 if how == "other-create-time" else created)

    new = world.ensure()

    assert new.verdict == "dead", new
    assert new.pid != stranger.pid and serving(new)
    assert stranger.poll() is None, "the unrelated process was signalled"
    assert identity.is_same_process(stranger.pid, created)
    record = world.record()
    assert record is not None and record.pid == new.pid


# -- dead, wedged and unhealthy brokers --------------------------------------------------------
def test_a_sigkilled_broker_is_replaced_and_its_app_server_died_with_it(world: World) -> None:
    old = world.ensure()
    record = world.record()
    assert record is not None and record.app_server_pid
    broker, fake = process(old.pid), process(record.app_server_pid)
    assert identity.signal_verified(old.pid, record.create_time, signal.SIGKILL)
    assert wait_exit(broker, 10)
    assert wait_exit(fake, 10), "the app-server outlived its SIGKILLed broker (no parent-death signal?)"

    new = world.ensure()

    assert new.verdict == "dead" and "gone" in new.reason, new
    assert_replaced(world, old, new)
    assert not os.path.exists(record.session_dir), "the dead broker's session directory was left"


def test_a_stopped_app_server_is_drained_without_force_never_signalled_and_replaced(world: World) -> None:
    """Unhealthy (it answers NOT_SERVING) is not proof of anything ensure may kill for: the old
    broker is asked to drain with its default deadline (its turns keep running if the stall
    passes; if the app-server really is wedged, the broker's own wedge rule ends it)."""
    old = world.ensure()
    status = world.client(old.endpoint).status()
    broker, fake = process(old.pid), process(status.app_server_pid)
    os.kill(fake.pid, signal.SIGSTOP)  # verified: psutil pinned its create time just above
    try:
        health_watch_until(old.endpoint, health_pb2.HealthCheckResponse.NOT_SERVING)

        new = world.ensure()
        assert wait_exit(broker, 15), "the drained broker with nothing in flight did not stop by itself"
    finally:
        if fake.is_running():
            fake.send_signal(signal.SIGCONT)  # psutil re-checks the create time first

    assert new.verdict == "unhealthy", new
    assert new.pid != old.pid and not new.reused and serving(new)
    record = world.record()
    assert record is not None and record.instance_id == new.instance_id
    drain = [line for line in Path(old.log_file).read_text().splitlines() if "drain started (unhealthy:" in line]
    assert len(drain) == 1 and "deadline 3600 s" in drain[0], drain
    assert "interrupting turns now" not in drain[0], "drained with force"
    assert "stopped exit_code=" in Path(old.log_file).read_text(), "the broker did not stop by itself"
    assert wait_exit(fake, 10), "the stopped app-server outlived its broker"
    entry = world.state().history()[-1]
    assert (entry.old_pid, entry.new_pid) == (old.pid, new.pid) and entry.reason.startswith("unhealthy:")


def test_a_stopped_broker_is_killed_as_wedged_and_replaced(world: World) -> None:
    old = world.ensure()
    record = world.record()
    assert record is not None and record.app_server_pid
    broker, fake = process(old.pid), process(record.app_server_pid)
    broker.send_signal(signal.SIGSTOP)
    try:
        new = world.ensure()
    finally:
        if broker.is_running():
            broker.send_signal(signal.SIGCONT)

    assert new.verdict == "wedged", new
    assert_replaced(world, old, new)
    assert wait_exit(broker, 10) and wait_exit(fake, 10), "the wedged broker or its app-server survived"
    assert not os.path.exists(record.session_dir)
    assert world.state().history()[-1].reason.startswith("wedged:")


# -- odd state files ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_corrupt_record_is_moved_aside_and_a_broker_spawned(world: World, damage: str) -> None:
    old = world.ensure()
    path = world.state().record_path
    text = path.read_text()
    damaged = text[: len(text) // 2] if damage == "truncated" else ""
    path.write_text(damaged)

    new = world.ensure()

    assert new.verdict == "none" and not new.reused, new
    assert new.pid != old.pid and serving(new)
    moved = sorted(path.parent.glob("broker.json.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_text() == damaged
    record = world.record()
    assert record is not None and record.pid == new.pid
    # The old broker can no longer be identified from the record: it is left alone (gc retires it).
    assert psutil.pid_exists(old.pid) and serving(old)


def test_a_record_naming_a_deleted_socket_is_wedged_and_replaced(world: World) -> None:
    old = world.ensure()
    record = world.record()
    assert record is not None and record.app_server_pid
    broker, fake = process(old.pid), process(record.app_server_pid)
    os.unlink(old.endpoint.removeprefix("unix:"))

    new = world.ensure()

    assert new.verdict == "wedged", new
    assert_replaced(world, old, new)
    assert wait_exit(broker, 10) and wait_exit(fake, 10)
    assert not os.path.exists(record.session_dir)
