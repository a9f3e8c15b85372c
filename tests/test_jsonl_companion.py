"""A companion-like client against a broker it started as the companion does: detached in its
own process group, ready when its JSONL socket accepts a connection (connect-only checks every
50 ms), then initialize, thread/start, turn/start, turn/completed, close; at the end
broker/shutdown, then SIGTERM to the broker's process group."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from harness import (
    ROOT,
    WAIT,
    JsonlSession,
    connect_only,
    fake_command,
    jsonl_flags,
    jsonl_path,
    new_marker,
    processes_with,
    run,
    short_dir,
    wait_gone,
)

READY_WITHIN = 20.0  # the companion waits 2 s; a loaded test machine gets longer


class CompanionBroker:
    """A broker spawned detached (its own process group) with its output in a log file."""

    def __init__(self, *flags: str) -> None:
        self.dir = short_dir()  # the companion's mkdtemp
        self.path = jsonl_path(self.dir)
        self.marker = new_marker()
        self.log = os.path.join(self.dir, "broker.log")
        argv = [sys.executable, "-m", "proxy", "serve", "--endpoint", f"unix:{self.dir}/g/s.sock",
                *jsonl_flags(self.path), "--pid-file", os.path.join(self.dir, "broker.pid"),
                "--app-server", fake_command(marker=self.marker), *flags]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        """Connect-only checks every 50 ms until one is accepted."""
        deadline = time.monotonic() + READY_WITHIN
        while True:
            assert self.proc.poll() is None, self.tail()
            with contextlib.suppress(OSError):
                assert connect_only(self.path) == b""
                return
            assert time.monotonic() < deadline, f"not ready within {READY_WITHIN:g} s\n{self.tail()}"
            time.sleep(0.05)

    def shutdown(self) -> bytes:
        """The session-end hook: broker/shutdown, wait for the first byte or the close, then
        SIGTERM to the process group."""
        first = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            # Another session's shutdown may get there first: the path is gone (connect fails),
            # or the listener closes with this connection not yet accepted (reset). Either way
            # the companion goes on to the signal.
            with contextlib.suppress(OSError):
                s.connect(self.path)
                s.sendall(b'{"id":1,"method":"broker/shutdown","params":{}}\n')
                first = s.recv(65536)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        return first

    def tail(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-3000:]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for proc in wait_gone(processes_with(self.marker), 5.0):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def companion_task(path: str, text: str, running: asyncio.Event | None = None) -> dict:
    """What one companion command does: initialize (id 1), initialized, thread/start (2),
    turn/start (3), wait for turn/completed, close (half-close, then wait for the broker's).
    ``running`` is set once the turn has started."""
    c = await JsonlSession.connect(path)
    init = await c.request("initialize", {"clientInfo": {"name": "companion-like", "version": "0"},
                                          "capabilities": {"experimentalApi": True}}, id=1)
    assert isinstance(init["result"], dict)
    await c.send({"method": "initialized"})
    thread = (await c.result("thread/start", {"cwd": "/tmp"}, id=2))["thread"]["id"]
    turn = (await c.result("turn/start", {"threadId": thread, "input": [{"type": "text", "text": text}]},
                           id=3))["turn"]["id"]
    if running is not None:
        running.set()
    completed = await c.turn_completed(thread, turn)
    await c.done_writing()
    assert await c.wait_end() == "closed"
    await c.close()
    return completed


# The end of a broker's life is where the event loops differ most (signal handlers): both are run.
LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


@LOOPS
def test_companion_like_client_runs_a_turn_then_shutdown_and_sigterm_stop_the_broker_cleanly(loop):
    b = CompanionBroker("--event-loop", loop)
    try:
        b.wait_ready()
        completed = run(companion_task(b.path, "deltas=10"))
        assert completed["params"]["turn"]["status"] == "completed"
        first = b.shutdown()
        assert json.loads(first.split(b"\n")[0]) == {"id": 1, "result": {}}
        assert b.proc.wait(WAIT) == 0, b.tail()
        assert not os.path.lexists(b.path)
        assert sorted(os.listdir(b.dir)) == ["broker.log"]  # socket, pid file and gRPC dir gone
        assert wait_gone(processes_with(b.marker), 5.0) == []
    finally:
        b.cleanup()


@LOOPS
def test_two_sessions_ending_together_do_not_kill_a_third_ones_running_turn(loop):
    b = CompanionBroker("--event-loop", loop)
    try:
        b.wait_ready()

        async def main():
            running = asyncio.Event()
            third = asyncio.create_task(companion_task(b.path, "deltas=20 seconds=3", running))
            await running.wait()
            # Two companions' session-end hooks, together: broker/shutdown + SIGTERM, each.
            firsts = await asyncio.gather(asyncio.to_thread(b.shutdown), asyncio.to_thread(b.shutdown))
            # Either hook may find the listener already closed by the other's drain (its SIGTERM
            # can land first): what each one does get is the broker/shutdown answer.
            answers = [json.loads(f.split(b"\n")[0]) for f in firsts if f]
            assert all(a == {"id": 1, "result": {}} for a in answers)
            return await third

        completed = run(main())
        assert completed["params"]["turn"]["status"] == "completed"  # not interrupted
        assert b.proc.wait(WAIT) == 0, b.tail()
    finally:
        b.cleanup()


def test_many_companion_like_clients_at_once_share_one_broker():
    b = CompanionBroker()
    try:
        b.wait_ready()

        async def main():
            return await asyncio.gather(*(companion_task(b.path, f"deltas={5 + i}") for i in range(12)))

        results = run(main())
        assert [r["params"]["turn"]["status"] for r in results] == ["completed"] * 12
        b.shutdown()
        assert b.proc.wait(WAIT) == 0, b.tail()
    finally:
        b.cleanup()
