"""Helpers for the end-to-end tests against the REAL ``codex app-server`` (tests/test_codex_e2e.py).

A :class:`CodexWorld` is one test's universe: a Responses-API mock (tests/mock_responses.py),
a ``CODEX_HOME`` pointing at it, a workspace, a private state dir and a short runtime dir, and
every broker the test obtained through ``lifecycle.ensure_broker``. Each broker is tracked by
pid + create time (from its state record), and so is every process found below it while it
lived (the npm launcher -- a Node wrapper -- and the native codex it runs), so the test can
check at the end that nothing of it survives, even a process that was reparented to init.

Signals go only to processes found this way (psutil re-checks the create time before every
signal); nothing is looked up by name.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mock_responses import MockResponses, write_codex_home
from proc_support import wait_for as wait_until  # noqa: F401 (re-exported)

from lifecycle.client import BrokerClient, Session
from lifecycle.ensure import BrokerSession, ensure_broker, workspace_state

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CODEX = "node_modules/.bin/codex"
NODE_NAMES = ("node", "nodejs")
AGE_VARIABLES = ("CODEX_BROKER_MAX_AGE_HOURS", "CODEX_COMPANION_BROKER_MAX_AGE_HOURS")
HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


def codex_launcher() -> Path:
    """``$CODEX_BIN`` (relative to the repo root if relative), else node_modules/.bin/codex."""
    raw = os.environ.get("CODEX_BIN") or DEFAULT_CODEX
    return Path(raw) if os.path.isabs(raw) else ROOT / raw


def require_codex(path: Path) -> None:
    """Missing codex is a test failure, never a skip: these tests are the only proof that the
    broker works with the real app-server."""
    if not path.exists():
        pytest.fail(f"the real codex is needed for this test and was not found at {path}: run "
                    f"`npm install @openai/codex@0.169.0` in {ROOT} (scripts/setup.sh with "
                    f"CODEX_BROKER_INSTALL_CODEX=1 does it), or set CODEX_BIN to a codex launcher",
                    pytrace=False)


def text_input(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "text_elements": []}]


# -- processes ----------------------------------------------------------------------------------
def alive(proc: psutil.Process) -> bool:
    """Alive and still the same process (psutil compares create times); a zombie is not alive."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} [{proc.status()}, ppid {proc.ppid()}] {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def wait_all_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until none of ``procs`` is alive; returns the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def is_native(proc: psutil.Process) -> bool:
    """The native codex (not the Node launcher): an ``app-server`` process whose exe is not node."""
    try:
        exe = os.path.basename(proc.exe())
        return exe not in NODE_NAMES and "app-server" in proc.cmdline()
    except psutil.Error:
        return False


@dataclass
class CodexTree:
    """The app-server of one broker: the launcher it spawned and the native codex doing the work
    (the same process when the launcher execs, as on Node >= 22.15)."""

    launcher: psutil.Process
    native: psutil.Process

    @property
    def processes(self) -> list[psutil.Process]:
        return [self.launcher] if self.launcher.pid == self.native.pid else [self.launcher, self.native]


@dataclass
class TrackedBroker:
    session: BrokerSession
    proc: psutil.Process  # the broker, pinned by pid + create time
    known: dict[int, psutil.Process] = field(default_factory=dict)  # everything seen below it

    @property
    def pid(self) -> int:
        return self.session.pid

    def note_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in self.proc.children(recursive=True):
                self.known.setdefault(child.pid, child)


class CodexWorld:
    """One test's codex universe; see the module docstring. Close with :meth:`finish`."""

    def __init__(self, tmp_path: Path, mock: MockResponses):
        self.mock = mock
        self.launcher = codex_launcher()
        self.workspace = tmp_path / "workspace"
        self.workspace.mkdir()
        self.state_dir = tmp_path / "state"
        self.runtime_dir = tempfile.mkdtemp(prefix="cxe", dir="/tmp")  # short: socket paths <= 107 bytes
        codex_env = write_codex_home(tmp_path / "codex-home", mock.base_url)
        env = {k: v for k, v in os.environ.items() if k not in AGE_VARIABLES}
        env.update(codex_env)
        env.update({"CODEX_BROKER_STATE_DIR": str(self.state_dir),
                    "CODEX_BROKER_RUNTIME_DIR": self.runtime_dir,
                    "CODEX_BROKER_APP_SERVER": shlex.join([str(self.launcher), "app-server"])})
        self.env = env
        self.brokers: list[TrackedBroker] = []
        self._clients: list[BrokerClient] = []
        self._sessions: list[Session] = []
        self._watcher = threading.Thread(target=self._watch_descendants, name="descendant-watch", daemon=True)
        self._stop_watch = threading.Event()
        self._watcher.start()

    # -- brokers --------------------------------------------------------------------------------
    def ensure(self, **env: str) -> BrokerSession:
        """``ensure_broker`` for the workspace with this world's environment (plus ``env``)."""
        require_codex(self.launcher)
        for tracked in self.brokers:
            tracked.note_descendants()
        session = ensure_broker(self.workspace, env={**self.env, **env}, spawn_timeout=30.0)
        self.track(session)
        return session

    def track(self, session: BrokerSession) -> TrackedBroker:
        for tracked in self.brokers:
            if tracked.pid == session.pid and tracked.session.instance_id == session.instance_id:
                tracked.note_descendants()
                return tracked
        _, state = workspace_state(self.workspace, self.env)
        record = state.read()
        assert record is not None and record.instance_id == session.instance_id, (record, session)
        proc = psutil.Process(record.pid)
        assert abs(proc.create_time() - record.create_time) < 0.01, "broker pid was recycled?"
        tracked = TrackedBroker(session, proc)
        tracked.note_descendants()
        self.brokers.append(tracked)
        return tracked

    def tracked(self, session: BrokerSession) -> TrackedBroker:
        return next(t for t in self.brokers if t.session.instance_id == session.instance_id)

    def _watch_descendants(self) -> None:
        """Notes every broker's descendants a few times a second, so a process that is
        reparented later (the native codex behind a killed launcher) is still known."""
        while not self._stop_watch.wait(0.1):
            for tracked in list(self.brokers):
                if alive(tracked.proc):
                    tracked.note_descendants()

    def codex_tree(self, session: BrokerSession) -> CodexTree:
        """The broker's app-server (Status.app_server_pid) and the native codex below it."""
        tracked = self.tracked(session)
        status = self.client(session).status()
        assert status.app_server_pid and status.app_server_alive, status
        launcher = psutil.Process(status.app_server_pid)
        assert launcher.ppid() == session.pid, f"app-server {describe(launcher)} is not a child of broker {session.pid}"
        candidates = [launcher, *launcher.children(recursive=True)]
        natives = [p for p in candidates if is_native(p)]
        assert len(natives) == 1, f"expected one native codex below the launcher: {[describe(p) for p in candidates]}"
        tracked.note_descendants()
        for proc in candidates:
            tracked.known.setdefault(proc.pid, proc)
        return CodexTree(launcher, natives[0])

    # -- clients --------------------------------------------------------------------------------
    def client(self, session: BrokerSession) -> BrokerClient:
        client = session.client()
        self._clients.append(client)
        return client

    def session(self, broker: BrokerSession, *, name: str = "e2e", opt_out: list[str] | None = None) -> Session:
        """An initialized Session on ``broker``."""
        s = self.client(broker).session()
        self._sessions.append(s)
        s.initialize(name, opt_out=opt_out)
        return s

    def watch_health(self, session: BrokerSession, timeout: float) -> Iterator[tuple[float, str]]:
        """(monotonic time, status name) for each health.v1 Watch update of ``session``'s broker."""
        stub = health_pb2_grpc.HealthStub(self.client(session).channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        try:
            for reply in call:
                yield time.monotonic(), HEALTH_NAMES.get(reply.status, str(reply.status))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise
        finally:
            call.cancel()

    # -- the end --------------------------------------------------------------------------------
    def leftovers(self, tracked: TrackedBroker, timeout: float) -> list[psutil.Process]:
        """What of ``tracked`` (the broker and everything seen below it) is alive after ``timeout``."""
        return wait_all_gone([tracked.proc, *tracked.known.values()], timeout)

    def assert_all_gone(self, tracked: TrackedBroker, timeout: float, what: str) -> None:
        """Fails (naming each survivor and its state) unless nothing of ``tracked`` is alive after
        ``timeout``; survivors are killed first (verified), so teardown does not report them again."""
        left = self.leftovers(tracked, timeout)
        if not left:
            return
        found = [describe(p) for p in left]
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        wait_all_gone(left, 5.0)
        raise AssertionError(f"{what}: processes of broker {tracked.pid} still alive after {timeout:g} s: "
                             f"{found}\n{self.log_tails()}")

    def finish(self, *, grace: float = 15.0) -> list[str]:
        """Stops every broker still running (Drain(force), then SIGINT twice, then SIGKILL, each
        to the verified broker pid), waits for all their processes, kills survivors, and returns
        the problems found: every process of a broker that outlived its broker."""
        for session in self._sessions:
            with contextlib.suppress(Exception):
                session.close()
        self._sessions.clear()
        problems: list[str] = []
        for tracked in self.brokers:
            tracked.note_descendants()
            if alive(tracked.proc):
                problems += self._stop_broker(tracked, grace)
        self._stop_watch.set()
        self._watcher.join(timeout=2)
        for tracked in self.brokers:
            left = self.leftovers(tracked, 5.0)
            for proc in left:
                problems.append(f"broker {tracked.pid}: process left behind: {describe(proc)}")
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGKILL)  # verified by create time; works on a stopped process too
            wait_all_gone(left, 5.0)
        for client in self._clients:
            client.close()
        self._clients.clear()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return problems

    def _stop_broker(self, tracked: TrackedBroker, grace: float) -> list[str]:
        with contextlib.suppress(Exception):
            with tracked.session.client() as client:
                client.drain(0.0, reason="test teardown", force=True, timeout=2.0)
        if not wait_all_gone([tracked.proc], grace):
            return []
        problems = [f"broker {tracked.pid} did not exit within {grace:g} s of Drain(force)"]
        for sig, wait in ((signal.SIGINT, 0.2), (signal.SIGINT, 8.0), (signal.SIGKILL, 5.0)):
            tracked.note_descendants()
            with contextlib.suppress(psutil.Error):
                tracked.proc.send_signal(sig)
            if not wait_all_gone([tracked.proc], wait):
                break
        return problems

    def log_tails(self, lines: int = 25) -> str:
        out = []
        for tracked in self.brokers:
            try:
                text = Path(tracked.session.log_file).read_text(errors="replace")
            except OSError:
                text = "(no log)"
            out.append(f"--- log of broker {tracked.pid} ({tracked.session.log_file}) ---\n"
                       + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)


def agent_text(turn: dict[str, Any]) -> str:
    """The agent message text of a completed turn (``turn.items`` holds the agent messages)."""
    return "".join(item.get("text", "") for item in turn.get("items") or [] if item.get("type") == "agentMessage")


def deltas(messages: list[dict[str, Any]], turn_id: str | None = None) -> list[str]:
    return [m["params"]["delta"] for m in messages
            if m.get("method") == "item/agentMessage/delta" and "id" not in m
            and (turn_id is None or m["params"].get("turnId") == turn_id)]


class Follower:
    """``Session.follow_turn`` on a thread of its own: every message it reads, with the time
    each arrived, and the outcome (the completed ``turn``, or the exception) with its time."""

    def __init__(self, session: Session, thread_id: str, turn_id: str, *, timeout: float = 60.0,
                 on_server_request: Callable[[dict[str, Any]], Any] | None = None):
        self.messages: list[dict[str, Any]] = []
        self.turn: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.done_at: float | None = None  # monotonic
        self.first_delta = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(session, thread_id, turn_id, timeout,
                                                                on_server_request),
                                        name=f"follow-{turn_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self, session: Session, thread_id: str, turn_id: str, timeout: float,
             on_server_request: Callable[[dict[str, Any]], Any] | None) -> None:
        try:
            self.turn = session.follow_turn(thread_id, turn_id, timeout=timeout, on_message=self._on_message,
                                            on_server_request=on_server_request)
        except BaseException as exc:  # reported by wait()/error_within()
            self.error = exc
        finally:
            self.done_at = time.monotonic()
            self._done.set()

    def _on_message(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        if msg.get("method") == "item/agentMessage/delta":
            self.first_delta.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait_first_delta(self, timeout: float) -> None:
        if not self.first_delta.wait(timeout):
            raise AssertionError(f"no agent message delta within {timeout:g} s (error: {self.error!r}); "
                                 f"messages: {[m.get('method') for m in self.messages]}")

    def wait(self, timeout: float) -> dict[str, Any]:
        """The completed turn; AssertionError if it did not complete in time or failed."""
        if not self._done.wait(timeout):
            raise AssertionError(f"turn not completed within {timeout:g} s; "
                                 f"last messages: {[m.get('method') for m in self.messages[-8:]]}")
        if self.error is not None:
            raise AssertionError(f"following the turn failed: {self.error!r}") from self.error
        assert self.turn is not None
        return self.turn

    def error_within(self, timeout: float) -> BaseException:
        """The exception that ended the follow; AssertionError if it did not end or completed."""
        if not self._done.wait(timeout):
            raise AssertionError(f"follow_turn still blocked after {timeout:g} s")
        if self.error is None:
            raise AssertionError(f"the turn completed instead of failing: {self.turn!r}")
        return self.error
