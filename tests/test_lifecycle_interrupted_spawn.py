"""An ensure SIGKILLed mid-spawn leaves no unrecorded broker running.

The spawn records the broker (marked starting) before it waits for SERVING. The next ensure
finds that record: within the spawn deadline it waits for the broker, as the spawn would have,
and reuses it once SERVING (recording it as ready); past the deadline, a broker still silent is
judged wedged (identity-verified kill) and replaced. Before, the record was written only once
the broker was SERVING, so a killed ensure left a broker that no record named, and the next
ensure started a second one."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from lifecycle_support import World, process, wait_exit, wait_until, world_for

from lifecycle.client import BrokerClient
from lifecycle.errors import BrokerError


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def _serving(endpoint: str) -> bool:
    try:
        with BrokerClient(endpoint) as client:
            return client.health(timeout=1.0) == "SERVING"
    except BrokerError:
        return False


def _recorded_but_not_serving(world: World) -> dict[str, object] | None:
    """The raw record, while the broker it names is alive and not SERVING yet."""
    try:
        data = json.loads(world.state().record_path.read_text())
    except (OSError, ValueError):
        return None
    if not psutil.pid_exists(data["pid"]) or _serving(data["endpoint"]):
        return None
    return data  # type: ignore[no-any-return]


def _kill_ensure_mid_spawn(world: World, startup_seconds: str) -> tuple[dict[str, object], psutil.Process]:
    """Runs `codex-broker ensure` with an app-server slow to initialize and SIGKILLs it while
    its broker is recorded but not SERVING yet. Returns the record and the orphaned broker."""
    slow = world.env_with(FAKE_STARTUP_SECONDS=startup_seconds)
    ensure = world.cli_popen("ensure", "--json", env=slow)
    try:
        data = wait_until(lambda: _recorded_but_not_serving(world), timeout=20,
                          what="the spawning broker to be recorded before it is SERVING")
    finally:
        ensure.kill()  # our own child: SIGKILL, mid-spawn
        ensure.communicate(timeout=30)
    assert isinstance(data["pid"], int)
    broker = process(data["pid"])
    assert [p.pid for p in world.brokers()] == [broker.pid]
    return data, broker


def test_a_broker_whose_ensure_was_killed_mid_spawn_is_waited_for_and_reused(world: World) -> None:
    data, broker = _kill_ensure_mid_spawn(world, startup_seconds="4")
    assert data.get("starting") is True

    session = world.ensure(world.env_with(FAKE_STARTUP_SECONDS="4"))

    assert session.pid == broker.pid and session.reused and session.verdict == "live", session
    assert _serving(session.endpoint)
    assert [p.pid for p in world.brokers()] == [broker.pid], "a second broker was started"
    record = world.record()
    assert record is not None and record.pid == broker.pid and not record.starting
    with BrokerClient(session.endpoint) as client:
        status = client.status()
    assert (record.started_at, record.version, record.app_server_pid) == \
        (status.started_at, status.version, status.app_server_pid)
    assert session.started_at == status.started_at


def test_a_broker_still_silent_past_the_spawn_deadline_is_killed_as_wedged_and_replaced(world: World) -> None:
    data, broker = _kill_ensure_mid_spawn(world, startup_seconds="600")  # never ready in this test
    fakes = wait_until(world.fakes, what="the starting broker's app-server")
    assert len(fakes) == 1

    session = world.ensure(spawn_timeout=5.0)

    assert session.verdict == "wedged" and "no answer" in session.reason, session
    assert session.pid != broker.pid and _serving(session.endpoint)
    assert wait_exit(broker, 10), "the wedged starting broker survived"
    assert wait_exit(fakes[0], 10), "its app-server survived"
    assert [p.pid for p in world.brokers()] == [session.pid]
    record = world.record()
    assert record is not None and record.pid == session.pid and not record.starting
    entry = world.state().history()[-1]
    assert (entry.old_pid, entry.new_pid) == (broker.pid, session.pid)
