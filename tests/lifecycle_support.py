"""Helpers for the lifecycle integration tests: one isolated world per test.

A :class:`World` owns a workspace, a state dir, a short runtime dir (unix socket paths stay
well under 100 bytes) and a unique marker passed to every fake app-server it configures
(``--marker=...``; the fake ignores unknown arguments). Brokers are real ``codex-broker
serve`` processes started by the code under test (``ensure_broker`` in-process, or the CLI in
a subprocess), so every process a test caused can be found afterwards: brokers by the runtime
dir in their ``--endpoint``, app-servers by the marker. :meth:`World.close` stops them all (by
verified pid: a broker is asked to drain with force, and killed only if it does not exit) and
reports every process the test left behind, which the fixture turns into a failure.

Nothing here reads the project's design documents; only the code under test and the fake.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proc_support import processes_with  # noqa: F401 (re-exported)
from proc_support import wait_for as wait_until  # noqa: F401 (re-exported)

from lifecycle import identity
from lifecycle.client import BrokerClient, Session
from lifecycle.ensure import BrokerSession, ensure_broker
from lifecycle.state import BrokerRecord, WorkspaceState, state_root

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_app_server.py"
WAIT = 30.0  # generous bound for anything that should happen within seconds
_CLI_SCRIPT = Path(sys.executable).with_name("codex-broker")
CLI = [str(_CLI_SCRIPT)] if _CLI_SCRIPT.exists() else [sys.executable, "-m", "lifecycle.cli"]
_INHERITED_PREFIXES = ("CODEX_BROKER_", "CODEX_COMPANION_", "FAKE_")


# -- processes ------------------------------------------------------------------------------
def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (``is_running`` also checks the create time, so a recycled pid
    does not count)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def process(pid: int) -> psutil.Process:
    """The live process ``pid`` (psutil pins its create time for later ``is_running`` checks)."""
    proc = psutil.Process(pid)
    assert alive(proc), f"pid {pid} is not running"
    return proc


def wait_exit(proc: psutil.Process, timeout: float = WAIT) -> bool:
    """Waits for the process to exit (psutil waits on our children, polls others); True if it did."""
    try:
        proc.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        return not alive(proc)
    except (psutil.NoSuchProcess, ChildProcessError):
        pass
    return True


def health_watch_until(endpoint: str, wanted: int, timeout: float = WAIT) -> None:
    """Follows a Health Watch stream until it reports ``wanted`` (an event, not a poll)."""
    with grpc.insecure_channel(endpoint) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=timeout)
        try:
            for reply in call:
                if reply.status == wanted:
                    return
        finally:
            call.cancel()
    raise AssertionError(f"the Health Watch of {endpoint} ended before reporting {wanted}")


# -- turns ----------------------------------------------------------------------------------
class Turn:
    """A turn started on a Session, followed on a thread of its own so the test can act while
    it runs. ``result()`` is the ``turn`` of ``turn/completed`` or raises what follow_turn raised."""

    def __init__(self, client: BrokerClient, text: str, *, timeout: float = WAIT):
        self.client = client
        self.session: Session = client.session()
        self.session.initialize("lifecycle-test")
        thread = self.session.request("thread/start", {}, timeout=timeout)
        self.thread_id: str = thread["thread"]["id"]
        started = self.session.request("turn/start", {"threadId": self.thread_id,
                                                      "input": [{"type": "text", "text": text}]}, timeout=timeout)
        self.turn_id: str = started["turn"]["id"]
        self.deltas: list[str] = []
        self.first_delta = threading.Event()
        self.last_message_at = time.monotonic()
        self.ended_at: float | None = None
        self._outcome: dict[str, Any] | BaseException | None = None
        self._done = threading.Event()
        self._timeout = timeout
        self._thread = threading.Thread(target=self._follow, name="follow-turn", daemon=True)
        self._thread.start()

    def _on_message(self, msg: dict[str, Any]) -> None:
        self.last_message_at = time.monotonic()
        if msg.get("method") == "item/agentMessage/delta":
            self.deltas.append(msg["params"].get("delta", ""))
            self.first_delta.set()

    def _follow(self) -> None:
        try:
            self._outcome = self.session.follow_turn(self.thread_id, self.turn_id, timeout=self._timeout,
                                                     on_message=self._on_message)
        except BaseException as exc:  # handed to the test thread by result()
            self._outcome = exc
        finally:
            self.ended_at = time.monotonic()
            self._done.set()

    def wait_first_delta(self) -> None:
        assert self.first_delta.wait(self._timeout), "the turn never streamed a delta"

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        assert self._done.wait(self._timeout + 5 if timeout is None else timeout), "following the turn hung"
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    def outcome(self, timeout: float | None = None) -> dict[str, Any] | BaseException:
        assert self._done.wait(self._timeout + 5 if timeout is None else timeout), "following the turn hung"
        assert self._outcome is not None
        return self._outcome

    def close(self) -> None:
        self.session.close()
        self._thread.join(timeout=5)


# -- one isolated world ---------------------------------------------------------------------
class World:
    """A workspace with its own state dir, runtime dir and fake app-server command."""

    def __init__(self, tmp_path: Path):
        self.marker = f"cxl{uuid.uuid4().hex[:12]}"
        self.runtime = tempfile.mkdtemp(prefix="cxr", dir="/tmp")
        self.state_dir = str(tmp_path / "state")
        self.workspace = tmp_path / "ws"
        self.workspace.mkdir()
        self.codex_home = tmp_path / "codex-home"
        self.codex_home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES) and k != "CODEX_HOME"}
        env.update(CODEX_BROKER_STATE_DIR=self.state_dir, CODEX_BROKER_RUNTIME_DIR=self.runtime,
                   CODEX_BROKER_APP_SERVER=self.fake_command(), CODEX_HOME=str(self.codex_home))
        self.env: dict[str, str] = env
        self._clients: list[BrokerClient] = []
        self._turns: list[Turn] = []
        self._strangers: list[subprocess.Popen[bytes]] = []

    # -- configuration -------------------------------------------------------------------
    def fake_command(self, *extra: str) -> str:
        return shlex.join([sys.executable, str(FAKE), f"--marker={self.marker}", *extra])

    def env_with(self, **changes: str | None) -> dict[str, str]:
        """The world's env with some variables set (or removed, for None)."""
        env = dict(self.env)
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    # -- the code under test ---------------------------------------------------------------
    def ensure(self, env: Mapping[str, str] | None = None, workspace: Path | None = None, **kwargs: Any
               ) -> BrokerSession:
        return ensure_broker(workspace or self.workspace, env=self.env if env is None else env, **kwargs)

    def state(self, workspace: Path | None = None) -> WorkspaceState:
        return WorkspaceState.for_cwd(workspace or self.workspace, state_root(self.env))

    def record(self, workspace: Path | None = None) -> BrokerRecord | None:
        return self.state(workspace).read()

    def cli(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], cwd=self.workspace, env=dict(self.env if env is None else env),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def cli_popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([*CLI, *args], cwd=self.workspace, env=dict(self.env if env is None else env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def client(self, endpoint: str) -> BrokerClient:
        client = BrokerClient(endpoint)
        self._clients.append(client)
        return client

    def turn(self, endpoint: str, text: str, *, timeout: float = WAIT) -> Turn:
        turn = Turn(self.client(endpoint), text, timeout=timeout)
        self._turns.append(turn)
        return turn

    def stranger(self) -> subprocess.Popen[bytes]:
        """An unrelated process (``sleep 60``); killed and reaped at teardown."""
        proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        self._strangers.append(proc)
        return proc

    # -- what the test caused ----------------------------------------------------------------
    def brokers(self) -> list[psutil.Process]:
        """Live broker processes listening in this world's runtime dir."""
        return [p for p in processes_with(f"unix:{self.runtime}/") if _is_broker(p)]

    def fakes(self) -> list[psutil.Process]:
        """Live fake app-servers started with this world's marker (as an argument of their own,
        not inside a broker's ``--app-server`` value)."""
        return processes_with(f"--marker={self.marker}", exact=True)

    def recorded_pids(self) -> set[int]:
        """Broker pids named by the workspace records and their rotation histories."""
        pids: set[int] = set()
        workspaces = Path(self.state_dir) / "workspaces"
        for path in workspaces.iterdir() if workspaces.is_dir() else ():
            state = WorkspaceState(path)
            record = _read_record_quietly(state)
            if record is not None:
                pids.add(record.pid)
            for entry in state.history():
                pids.update(p for p in (entry.old_pid, entry.new_pid) if p)
        return pids

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Stops everything the test caused; returns a description of what was left running."""
        for turn in self._turns:
            turn.close()
        for client in self._clients:
            client.close()
        for proc in self._strangers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        brokers = {p.pid: p for p in self.brokers()}
        for pid in self.recorded_pids() - set(brokers):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if alive(proc) and _is_broker(proc) and f"unix:{self.runtime}/" in " ".join(proc.cmdline()):
                    brokers[pid] = proc
        for proc in brokers.values():
            _stop_broker(proc)
        leftovers = [p for p in self.fakes() if not wait_exit(p, 10)]
        leftovers += self.brokers()
        report = [f"pid {p.pid}: {_cmdline(p)}" for p in leftovers]
        for proc in leftovers:  # do not leak them into the next test, but fail this one
            with contextlib.suppress(psutil.Error):
                identity.signal_verified(proc.pid, proc.create_time(), signal.SIGKILL)
        shutil.rmtree(self.runtime, ignore_errors=True)
        return report


@contextlib.contextmanager
def world_for(tmp_path: Path) -> Iterator[World]:
    """The fixture body: a World, closed at the end; fails the test if anything was left running."""
    world = World(tmp_path)
    try:
        yield world
    finally:
        leftovers = world.close()
    assert not leftovers, "processes left running after the test:\n" + "\n".join(leftovers)


def _read_record_quietly(state: WorkspaceState) -> BrokerRecord | None:
    """The record without moving a corrupt one aside (teardown must not change the evidence)."""
    try:
        return BrokerRecord.from_json(json.loads(state.record_path.read_bytes()))
    except (OSError, ValueError):
        return None


def _is_broker(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return "serve" in cmdline and "--endpoint" in cmdline


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "?"


def _endpoint_of(proc: psutil.Process) -> str | None:
    cmdline = proc.cmdline()
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag == "--endpoint":
            return value
    return None


def _stop_broker(proc: psutil.Process) -> None:
    """Drain with force (turns interrupted) and wait; SIGKILL the group by verified pid if it
    does not exit (a stopped or wedged broker)."""
    try:
        created = proc.create_time()
        endpoint = _endpoint_of(proc)
        stopped = proc.status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return
    if endpoint and not stopped:
        with contextlib.suppress(Exception), BrokerClient(endpoint) as client:
            client.drain(0.0, reason="test teardown", force=True, timeout=2.0)
        if wait_exit(proc, 15):
            return
    identity.signal_verified(proc.pid, created, signal.SIGKILL, group=True)
    wait_exit(proc, 10)
