"""The CPU scheduling policy of `serve`'s event loop: SCHED_BATCH while the app-server streams at
1 MiB/s or more, the normal policy otherwise (the default, `batch`); `--cpu-scheduling normal` or
CODEX_BROKER_CPU_SCHEDULING=normal (the flag wins) never switches, nor does a broker started under
another policy than the normal one; the app-server always runs as the broker was started. The
switching rule itself is tested on a clock of the test's own (``StreamPacer``). What the policy is
for is measured in bench/ (docs/BENCHMARKS.md), not here."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import (
    JsonlSession,
    error_lines,
    fake_command,
    jsonl_flags,
    jsonl_path,
    new_marker,
    processes_with,
    run,
    run_serve,
    short_dir,
)
from proc_support import wait_for

from proxy import child as child_process
from proxy import scheduling

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="scheduling policies are Linux's")

# Starts what follows under SCHED_IDLE, as `chrt --idle 0` would (a policy other than the normal one).
UNDER_IDLE = [sys.executable, "-c", "import os, sys; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
TO_BATCH = "cpu scheduling: batch (the app-server streams)"
TO_OTHER = "cpu scheduling: other (the stream stopped)"


def policies(pid: int) -> set[str]:
    """The policies of the threads of ``pid``."""
    found = set()
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            found.add(scheduling.policy_name(os.sched_getscheduler(tid)))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return found


@pytest.fixture
def jb(broker: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Factory: a broker logging at debug level and serving JSONL too; returns (broker, JSONL path)."""
    dirs = []

    def start(*flags: str, **kw: Any) -> tuple[Any, str]:
        directory = short_dir()
        dirs.append(directory)
        path = jsonl_path(directory)
        return broker(*jsonl_flags(path), "--log-level", "debug", *flags, **kw), path

    yield start
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def stream_a_turn(path: str, deltas: int = 20_000) -> int:
    """One turn of ``deltas`` deltas written as fast as the fake can (~4 MB), read to its end;
    how many of them arrived."""
    async def go() -> int:
        c = await JsonlSession.connect(path)
        await c.initialize()
        thread = await c.start_thread()
        turn = await c.start_turn(thread, f"deltas={deltas} seconds=0")
        await c.turn_completed(thread, turn)
        got = sum(1 for m in c.messages if m.get("method") == "item/agentMessage/delta")
        await c.close()
        return got
    return run(go())


@pytest.mark.parametrize("flags, env", [
    ((), {}),
    ((), {scheduling.CPU_SCHEDULING_ENV: "Batch "}),
    (("--cpu-scheduling", "batch"), {scheduling.CPU_SCHEDULING_ENV: "normal"}),
])
def test_the_loop_is_under_batch_while_the_app_server_streams_and_under_the_normal_policy_otherwise(jb, flags, env):
    b, path = jb(*flags, env=env)
    assert "cpu scheduling: batch while the app-server streams, else other; the app-server always other" in b.log()
    app_server = b.status().app_server_pid
    assert policies(b.pid) == {"other"} and policies(app_server) == {"other"}
    assert stream_a_turn(path) == 20_000
    assert TO_BATCH in b.log()
    wait_for(lambda: TO_OTHER in b.log(), what="back under the normal policy once the stream stopped")
    assert b.log().index(TO_BATCH) < b.log().index(TO_OTHER)
    assert policies(b.pid) == {"other"}, "every thread of the broker is back under the normal policy"
    assert policies(app_server) == {"other"}, "the app-server was never switched"
    assert b.call("account/read").result_json  # requests between streams: no switch
    assert b.log().count(TO_BATCH) == 1
    b.drain()
    assert b.wait_exit(30) == 0


@pytest.mark.parametrize("flags, env", [
    (("--cpu-scheduling", "normal"), {scheduling.CPU_SCHEDULING_ENV: "batch"}),
    ((), {scheduling.CPU_SCHEDULING_ENV: "NORMAL"}),
])
def test_normal_never_switches(jb, flags, env):
    b, path = jb(*flags, env=env)
    assert "cpu scheduling: as started (other)" in b.log()
    assert stream_a_turn(path) == 20_000
    assert "cpu scheduling: batch" not in b.log().split("as started (other)")[1]
    assert policies(b.pid) == {"other"} and policies(b.status().app_server_pid) == {"other"}


def test_a_broker_started_under_another_policy_keeps_it_and_so_does_its_app_server(jb):
    b, path = jb(argv_prefix=UNDER_IDLE)
    assert "cpu scheduling: as started (idle, which batch does not replace)" in b.log()
    assert stream_a_turn(path) == 20_000
    assert TO_BATCH not in b.log()
    assert policies(b.pid) == {"idle"} and policies(b.status().app_server_pid) == {"idle"}


def test_a_child_spawned_while_the_thread_is_under_batch_runs_under_the_normal_policy(monkeypatch):
    """The app-server inherits nothing of the switch, whenever it is spawned."""
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert scheduling._switch(True)
    try:
        assert scheduling.child_policy() == os.SCHED_OTHER
        child = child_process.spawn([sys.executable, "-c", "import sys; sys.stdin.read()"], cwd=None)
        try:
            assert policies(child.pid) == {"other"}
            assert os.sched_getscheduler(0) == os.SCHED_BATCH
        finally:
            child_process.kill(child)
    finally:
        assert scheduling._switch(False)
    assert scheduling.child_policy() is None


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


# -- the switching rule, on the test's own clock -----------------------------------------------
class Clock:
    """A loop's time and timers, advanced by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None], list[bool]]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        cancelled = [False]
        self.timers.append((self.now + delay, callback, cancelled))

        class Handle:
            def cancel(self) -> None:
                cancelled[0] = True
        return Handle()

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while due := sorted((t for t in self.timers if t[0] <= end), key=lambda t: t[0]):
            at, callback, cancelled = due[0]
            self.timers.remove(due[0])
            self.now = at
            if not cancelled[0]:
                callback()
        self.now = end


RATE = scheduling.STAY_RATE
WINDOW = scheduling.WINDOW
ENTER_RATE = scheduling.ENTER_BYTES / scheduling.ENTER_WINDOW
FLOOD = 16 * RATE  # a turn's deltas at full speed: ~40 MB/s


def pacer(refuse: bool = False, enabled: bool = True) -> tuple[scheduling.StreamPacer, Clock, list[bool]]:
    clock, asked = Clock(), []

    def switch(batch: bool) -> bool:
        asked.append(batch)
        return not refuse
    return scheduling.StreamPacer(clock, enabled=enabled, switch=switch), clock, asked


def feed(p: scheduling.StreamPacer, clock: Clock, rate: float, seconds: float, step: float = 0.01) -> None:
    """``rate`` bytes per second for ``seconds``, in reads every ``step`` seconds."""
    for _ in range(round(seconds / step)):
        clock.advance(step)
        p.saw(int(rate * step))


def test_below_the_rate_nothing_switches_however_long_it_lasts():
    p, clock, asked = pacer()
    feed(p, clock, RATE * 0.6, 30.0)
    assert asked == [] and not p.batch


def test_at_the_rate_it_switches_once_stays_while_the_stream_lasts_and_is_back_one_window_after():
    p, clock, asked = pacer()
    feed(p, clock, FLOOD, 0.2)
    assert asked == [True] and p.batch
    feed(p, clock, FLOOD, 10.0)
    assert asked == [True] and p.batch, "checked every window while the stream lasts, never switched again"
    clock.advance(2 * WINDOW)  # the stream stopped
    assert asked == [True, False] and not p.batch and p.switches == 2
    feed(p, clock, FLOOD, 0.5)  # the next stream
    assert asked == [True, False, True] and p.batch


def test_it_enters_only_above_the_rate_it_stays_at():
    """Hysteresis: ~3 MiB/s to enter, 1 MiB/s to stay."""
    p, clock, asked = pacer()
    feed(p, clock, ENTER_RATE * 0.6, 5.0, step=0.001)
    assert asked == [] and not p.batch
    feed(p, clock, ENTER_RATE * 1.5, 0.05, step=0.001)
    assert asked == [True], "entered within a few milliseconds"
    feed(p, clock, RATE * 1.5, 5.0)
    assert asked == [True] and p.batch
    feed(p, clock, RATE * 0.5, 1.0)
    assert asked == [True, False] and not p.batch


def test_one_large_message_is_one_short_spell_of_batch_at_most():
    p, clock, asked = pacer()
    clock.advance(5.0)
    p.saw(4 << 20)  # a 4 MiB response, after a long quiet
    clock.advance(0.01)
    p.saw(200)
    assert not p.batch, "that much over a long time is no stream"
    p.saw(4 << 20)  # another one at once: as fast as a stream
    assert p.batch
    clock.advance(WINDOW)
    assert asked == [True, False] and not p.batch


def test_a_refused_switch_leaves_the_pacer_inert():
    p, clock, asked = pacer(refuse=True)
    feed(p, clock, FLOOD, 1.0)
    assert asked == [True] and not p.batch and not p.enabled


def test_close_puts_the_thread_back_and_cancels_the_check():
    p, clock, asked = pacer()
    feed(p, clock, FLOOD, 0.2)
    p.close()
    assert asked == [True, False] and not p.batch and not p.enabled
    clock.advance(10 * WINDOW)
    feed(p, clock, FLOOD, 0.5)
    assert asked == [True, False]


def test_a_pacer_not_enabled_never_switches():
    p, clock, asked = pacer(enabled=False)
    feed(p, clock, FLOOD, 1.0)
    assert asked == [] and not p.batch


def test_serve_alone_enables_it():
    """A broker embedded in another process (these tests' own) never switches that process's
    threads: only `serve`, by ``prepare``, enables the pacer."""
    assert scheduling.StreamPacer(Clock()).enabled is False
    assert subprocess.run([sys.executable, "-c", "from proxy import scheduling; import sys; "
                           "print(scheduling.prepare('batch')); "
                           "print(scheduling.StreamPacer(type('L', (), {'time': lambda s: 0.0})()).enabled)"],
                          capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))).stdout.splitlines()[1] == "True"
