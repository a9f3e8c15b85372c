"""The CPU scheduling policy `serve` runs under: SCHED_BATCH by default (every thread of the
broker), the app-server under the policy the broker was started with; `--cpu-scheduling normal`
or CODEX_BROKER_CPU_SCHEDULING=normal (the flag wins) leaves the policy as started, and a broker
started under another policy than the normal one keeps it. What the policy is for is measured in
bench/ (docs/BENCHMARKS.md), not here."""
from __future__ import annotations

import json
import os
import sys

import pytest
from harness import error_lines, fake_command, new_marker, processes_with, run_serve

from proxy import scheduling

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="scheduling policies are Linux's")

# Starts what follows under SCHED_IDLE, as `chrt --idle 0` would (a policy other than the normal one).
UNDER_IDLE = [sys.executable, "-c", "import os, sys; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


def policies(pid: int) -> dict[int, str]:
    """The policy of each thread of ``pid``, by thread id."""
    found = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            found[tid] = scheduling.policy_name(os.sched_getscheduler(tid))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return found


def check_serves(b) -> None:
    reply = b.call("thread/start", {"cwd": "/tmp"})
    assert json.loads(reply.result_json)["thread"]["id"]


@pytest.mark.parametrize("flags, env", [
    ((), {}),
    ((), {scheduling.CPU_SCHEDULING_ENV: "Batch "}),
    (("--cpu-scheduling", "batch"), {scheduling.CPU_SCHEDULING_ENV: "normal"}),
])
def test_the_broker_runs_under_batch_on_every_thread_and_its_app_server_as_the_broker_was_started(broker, flags, env):
    b = broker(*flags, env=env)
    check_serves(b)
    threads = policies(b.pid)
    assert len(threads) > 1, "gRPC's threads are started after the policy is set, and inherit it"
    assert set(threads.values()) == {"batch"}, threads
    app_server = b.status().app_server_pid
    assert set(policies(app_server).values()) == {"other"}
    assert "cpu scheduling: batch (the app-server runs as the broker was started: other)" in b.log()
    b.drain()
    assert b.wait_exit(30) == 0


@pytest.mark.parametrize("flags, env", [
    (("--cpu-scheduling", "normal"), {scheduling.CPU_SCHEDULING_ENV: "batch"}),
    ((), {scheduling.CPU_SCHEDULING_ENV: "NORMAL"}),
])
def test_normal_leaves_the_broker_and_its_app_server_as_started(broker, flags, env):
    b = broker(*flags, env=env)
    check_serves(b)
    assert set(policies(b.pid).values()) == {"other"}
    assert set(policies(b.status().app_server_pid).values()) == {"other"}
    assert "cpu scheduling: as started (other)" in b.log()


def test_a_broker_started_under_another_policy_keeps_it_and_so_does_its_app_server(broker):
    b = broker(argv_prefix=UNDER_IDLE)
    check_serves(b)
    assert set(policies(b.pid).values()) == {"idle"}
    assert set(policies(b.status().app_server_pid).values()) == {"idle"}
    assert "cpu scheduling: as started (idle, which batch does not replace)" in b.log()


def test_an_unknown_policy_in_the_environment_is_refused_before_anything_starts(base):
    marker = new_marker()
    sock_dir = os.path.join(base, "d")
    result = run_serve("--endpoint", f"unix:{sock_dir}/s.sock", "--app-server", fake_command(marker=marker),
                       env={scheduling.CPU_SCHEDULING_ENV: "fifo"})
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert scheduling.CPU_SCHEDULING_ENV in line and "'fifo'" in line and "batch, normal" in line
    assert not os.path.exists(sock_dir)
    assert not processes_with(marker)


def test_an_unknown_policy_flag_is_a_usage_error(base):
    result = run_serve("--endpoint", f"unix:{base}/s.sock", "--cpu-scheduling", "idle")
    assert result.returncode == 2
    assert "--cpu-scheduling" in result.stderr and "invalid choice" in result.stderr


def test_the_choice_is_the_flag_then_the_variable_then_batch():
    assert scheduling.choice(None, {}) == scheduling.BATCH
    assert scheduling.choice(None, {scheduling.CPU_SCHEDULING_ENV: ""}) == scheduling.BATCH
    assert scheduling.choice(None, {scheduling.CPU_SCHEDULING_ENV: " Normal "}) == scheduling.NORMAL
    assert scheduling.choice("batch", {scheduling.CPU_SCHEDULING_ENV: "normal"}) == scheduling.BATCH
    with pytest.raises(scheduling.SchedulingError, match="CODEX_BROKER_CPU_SCHEDULING"):
        scheduling.choice(None, {scheduling.CPU_SCHEDULING_ENV: "idle"})


def test_policy_names_ignore_the_reset_on_fork_flag():
    assert scheduling.policy_name(os.SCHED_BATCH) == "batch"
    assert scheduling.policy_name(os.SCHED_OTHER | getattr(os, "SCHED_RESET_ON_FORK", 0)) == "other"
