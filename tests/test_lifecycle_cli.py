"""Every ``codex-broker`` command, run as a user would (a subprocess in the workspace), and its
exit codes: 0 success, 1 an error on one line (call: a JSON-RPC error), 2 bad input or cannot
connect, 3 an RPC failed, 4 health NOT_SERVING."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_support import World, process, wait_exit, wait_until, world_for

from protos import broker_pb2


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def ok(result: object) -> str:
    assert getattr(result, "returncode", None) == 0, result
    return str(result.stdout)  # type: ignore[attr-defined]


# -- ensure, status ---------------------------------------------------------------------------
def test_ensure_prints_where_the_broker_is_and_reuses_it(world: World) -> None:
    first = ok(world.cli("ensure")).strip()
    record = world.record()
    assert record is not None
    assert first == f"{record.endpoint} pid {record.pid} started (none: no broker record)"

    data = json.loads(ok(world.cli("ensure", "--json")))
    assert {"endpoint", "pid", "instance_id", "started_at"} <= set(data)
    assert (data["endpoint"], data["pid"], data["instance_id"]) == (record.endpoint, record.pid, record.instance_id)
    assert data["started_at"] == pytest.approx(record.started_at)
    assert data["reused"] is True and data["verdict"] == "live"
    assert ok(world.cli("ensure")).strip() == f"{record.endpoint} pid {record.pid} reused"


def test_status_shows_state_pids_sessions_and_in_flight_turns(world: World) -> None:
    broker = world.ensure()
    turn = world.turn(broker.endpoint, "seconds=20 deltas=20")
    status = world.client(broker.endpoint).status()

    table = ok(world.cli("status"))
    rows = {line[:17].strip(): line[17:] for line in table.splitlines() if not line.startswith(" ")}
    assert rows["state"].startswith("SERVING")
    assert rows["pid"].startswith(f"{broker.pid},")
    assert rows["app-server"].startswith(f"pid {status.app_server_pid} (alive)")
    assert rows["sessions"] == "1"
    assert rows["in-flight turns"] == "1"
    assert f"turn {turn.turn_id} on thread {turn.thread_id}" in table

    data = json.loads(ok(world.cli("status", "--json")))
    assert data["pid"] == broker.pid and data["instance_id"] == broker.instance_id
    assert data["state"] == "BROKER_STATE_SERVING" and data["app_server_pid"] == status.app_server_pid
    assert data["open_sessions"] == 1
    assert [t["turn_id"] for t in data["in_flight_turns"]] == [turn.turn_id]
    assert json.loads(ok(world.cli("status", "--json", "--endpoint", broker.endpoint)))["pid"] == broker.pid


def test_status_without_a_broker_fails_with_one_line_and_never_spawns(world: World) -> None:
    result = world.cli("status")
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"codex-broker status: no broker is recorded for {os.path.realpath(world.workspace)} "
        "(run: codex-broker ensure)"]
    assert world.brokers() == []


# -- health -----------------------------------------------------------------------------------
def test_health_exit_codes_follow_grpc_health_probe(world: World) -> None:
    assert world.cli("health").returncode == 2, "no recorded broker: cannot connect (and never spawn)"
    assert world.brokers() == []
    broker = world.ensure()

    serving = world.cli("health")
    assert (serving.returncode, serving.stdout.strip()) == (0, "status: SERVING"), serving
    assert world.cli("health", "--service", "codexbroker.v1.AppServer").returncode == 0

    nowhere = world.cli("health", "--endpoint", f"unix:{world.runtime}/nobody/s.sock", "--connect-timeout", "0.5")
    assert nowhere.returncode == 2, nowhere
    assert "cannot connect" in nowhere.stderr

    unknown = world.cli("health", "--service", "no.such.Service")
    assert unknown.returncode == 3, unknown
    assert "NOT_FOUND" in unknown.stderr

    world.turn(broker.endpoint, "seconds=20 deltas=20")
    reply = world.client(broker.endpoint).drain(0.0, reason="test: draining with a turn in flight")
    assert reply.state == broker_pb2.BROKER_STATE_DRAINING and reply.in_flight_turns == 1
    draining = world.cli("health")
    assert (draining.returncode, draining.stdout.strip()) == (4, "status: NOT_SERVING"), draining


# -- drain, rotate, stop ----------------------------------------------------------------------
def test_drain_wait_returns_once_the_broker_has_exited(world: World) -> None:
    broker = world.ensure()
    proc = process(broker.pid)

    out = ok(world.cli("drain", "--wait"))

    assert f"broker pid {broker.pid}: DRAINING" in out and f"broker pid {broker.pid} exited" in out
    assert wait_exit(proc, 0.5), "drain --wait returned before the broker exited"


def test_rotate_starts_a_new_broker_and_the_old_one_drains_away(world: World) -> None:
    old = world.ensure()
    old_proc = process(old.pid)

    data = json.loads(ok(world.cli("rotate", "--json")))

    assert data["pid"] != old.pid and data["verdict"] == "aged" and data["reason"] == "rotate: requested"
    assert wait_exit(old_proc, 15)
    again = world.ensure()
    assert again.reused and again.pid == data["pid"]
    assert world.state().history()[-1].reason == "rotate: requested"


def test_stop_waits_for_the_running_turn_then_the_broker_exits(world: World) -> None:
    broker = world.ensure()
    proc = process(broker.pid)
    turn = world.turn(broker.endpoint, "seconds=5 deltas=15")
    stop = world.cli_popen("stop")
    client = world.client(broker.endpoint)
    wait_until(lambda: client.status().state == broker_pb2.BROKER_STATE_DRAINING, what="the broker to drain")
    exited_early = stop.poll()
    assert len(client.status().in_flight_turns) == 1  # the broker still answers, with the turn running
    assert exited_early is None, "stop returned while the broker was still running"

    completed = turn.result()
    out, err = stop.communicate(timeout=30)

    assert completed["status"] == "completed" and len(turn.deltas) == 15
    assert stop.returncode == 0, err
    assert out.strip().endswith(f"broker pid {broker.pid} stopped")
    assert wait_exit(proc, 0.5)
    assert world.record() is None, "stop left the broker recorded"


@pytest.mark.parametrize("turn_text", [
    "seconds=60 deltas=60",
    # Slow to acknowledge its interrupt (7 s): the broker's forced stop waits up to its interrupt
    # grace (10 s) for the turn/completed, and the CLI must not SIGKILL it before (it did at 5 s).
    "seconds=60 deltas=60 linger=7",
], ids=["prompt", "slow to acknowledge"])
def test_stop_force_interrupts_the_turn_reports_it_to_its_client_and_stops(world: World, turn_text: str) -> None:
    broker = world.ensure()
    proc = process(broker.pid)
    turn = world.turn(broker.endpoint, turn_text)
    turn.wait_first_delta()

    result = world.cli("stop", "--force", timeout=60)

    assert result.returncode == 0, result
    assert turn.result(timeout=30)["status"] == "interrupted"
    assert wait_exit(proc, 0.5)
    assert world.record() is None


# -- call -------------------------------------------------------------------------------------
def test_call_ensures_a_broker_and_prints_the_result_as_json(world: World) -> None:
    result = json.loads(ok(world.cli("call", "thread/loaded/list")))
    assert result == {"data": [], "nextCursor": None}
    assert len(world.brokers()) == 1

    echoed = json.loads(ok(world.cli("call", "fake/echo", '{"n": 12345678901234567890, "s": "é"}')))
    assert echoed == {"params": {"n": 12345678901234567890, "s": "é"}}


def test_call_with_a_json_rpc_error_prints_it_and_exits_1(world: World) -> None:
    result = world.cli("call", "no/such/method")
    assert result.returncode == 1, result
    error = json.loads(result.stdout)["error"]
    assert error["code"] == -32601 and "no/such/method" in error["message"]


def test_call_with_bad_params_json_exits_2_without_spawning(world: World) -> None:
    result = world.cli("call", "thread/start", "{not json")
    assert result.returncode == 2, result
    assert result.stderr.startswith("codex-broker call: PARAMS_JSON is not valid JSON")
    assert world.brokers() == []


# -- gc ---------------------------------------------------------------------------------------
def test_gc_drains_orphans_removes_dead_session_dirs_and_leaves_recorded_brokers_alone(
        world: World, tmp_path: Path) -> None:
    recorded = world.ensure()
    other = tmp_path / "ws2"
    other.mkdir()
    orphan = world.ensure(workspace=other)
    orphan_proc = process(orphan.pid)
    world.state(other).record_path.unlink()  # no workspace names it any more
    dead_dir = Path(world.runtime) / "deadbeef"
    dead_dir.mkdir(mode=0o700)
    (dead_dir / "s.sock").touch()

    old = world.env_with(CODEX_BROKER_SPAWN_TIMEOUT="0")  # no broker or directory counts as still starting

    dry = ok(world.cli("gc", "--dry-run", env=old))

    assert f"would drain orphaned broker pid {orphan.pid}" in dry
    assert f"would remove dead session directory {dead_dir}" in dry
    assert str(recorded.pid) not in dry
    assert dead_dir.exists() and world.client(orphan.endpoint).health() == "SERVING"

    out = ok(world.cli("gc", env=old))

    assert f"asked orphaned broker pid {orphan.pid} to drain" in out
    assert f"removed dead session directory {dead_dir}" in out
    assert wait_exit(orphan_proc, 15), "the orphaned broker did not exit after gc drained it"
    assert not dead_dir.exists()
    assert world.client(recorded.endpoint).health() == "SERVING"
    assert world.ensure().pid == recorded.pid
    report = json.loads(ok(world.cli("gc", "--json", env=old)))
    assert report["actions"] == [] and report["brokers"] == 1
