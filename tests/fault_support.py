"""Helpers for the fault, soak, access and state-recovery tests (test_soak.py,
test_bad_input.py, test_access.py, test_state_recovery.py).

Self-contained on purpose (it does not import conftest): real broker processes on real unix
sockets in front of tests/fake_app_server.py, processes found by a unique ``--marker=...``
argument that the fake ignores, and waits that are events (a Health Watch, a process exit)
or bounded polls of a condition that has no event.

- ``ServedBroker``: one ``python -m proxy serve`` subprocess, ready when its Health Watch says
  SERVING; ``stop()`` stops it by its own PID and reports anything left behind.
- ``RawSession``: a grpc.aio AppServer.Session that sends raw text and records every message.
- ``Ledger`` and ``RecordingSession``: the soak's accounting, one entry per request id and per
  turn, fed by every message a lifecycle ``Session`` receives.
- ``OtherUser``: run a small program as another local user (for the access tests).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proc_support import WAIT, cmdline, gone, processes_with, wait_for, wait_gone  # noqa: F401 (re-exported)

from lifecycle.client import Session as LifecycleSession
from protos import broker_pb2, broker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_app_server.py"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


# -- small facts ----------------------------------------------------------------------------
def new_marker() -> str:
    return f"cxbfault-{uuid.uuid4().hex[:12]}"


def fake_command(marker: str, *args: str) -> str:
    """The fake app-server's command line (shell-style), tagged with ``marker``."""
    return shlex.join([sys.executable, str(FAKE), f"--marker={marker}", *args])


def short_dir(prefix: str = "cxf") -> str:
    """A fresh directory with a short path (unix socket paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def open_fds() -> list[str]:
    """What the test process's descriptors point at (for counting and for diagnostics)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue  # the descriptor listdir itself used
    return out


def health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def wait_serving(endpoint: str, proc: subprocess.Popen[bytes], timeout: float, log_tail: Callable[[], str]) -> None:
    """Returns when the broker's Health Watch says SERVING; fails at once if the process exits.

    The Watch waits for the socket to appear (wait_for_ready), and a thread cancels it the moment
    the process exits, so nothing here is a sleep."""
    with grpc.insecure_channel(endpoint) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=timeout, wait_for_ready=True)

        def watch_exit() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout + 5)
            call.cancel()

        threading.Thread(target=watch_exit, name="serve-exit-watch", daemon=True).start()
        try:
            for reply in call:
                if reply.status == SERVING:
                    call.cancel()
                    return
        except grpc.RpcError as exc:
            raise AssertionError(f"broker not SERVING (exit status {proc.poll()}, "
                                 f"{exc.code().name}):\n{log_tail()}") from None  # type: ignore[attr-defined]
    raise AssertionError(f"broker health watch ended before SERVING:\n{log_tail()}")


# -- one `python -m proxy serve` ----------------------------------------------------------------
class ServedBroker:
    """A broker started directly with ``python -m proxy serve`` in front of the fake."""

    def __init__(self, *flags: str, fake_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log_path: Path | None = None, ready_timeout: float = 20.0):
        self.marker = new_marker()
        self.base = short_dir("cxbi")
        self.dir = os.path.join(self.base, "d")  # fresh: the broker creates it 0700
        self.sock = os.path.join(self.dir, "s.sock")
        self.endpoint = f"unix:{self.sock}"
        self.log_path = log_path or Path(self.base) / "broker.log"
        self.command = fake_command(self.marker, *fake_args)
        argv = [sys.executable, "-m", "proxy", "serve", "--endpoint", self.endpoint, "--app-server", self.command,
                *flags]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        self._channel: grpc.Channel | None = None
        try:
            wait_serving(self.endpoint, self.proc, ready_timeout, self.tail)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
        return self._channel

    def health(self, timeout: float = 5.0) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return health_name(stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status)

    def status(self, timeout: float = 5.0) -> broker_pb2.BrokerStatus:
        return broker_pb2_grpc.BrokerStub(self.channel).Status(broker_pb2.StatusRequest(), timeout=timeout)

    def status_until(self, predicate: Callable[[broker_pb2.BrokerStatus], bool], what: str,
                     timeout: float = WAIT) -> broker_pb2.BrokerStatus:
        """Polls Status (no event carries these counters) until ``predicate`` holds."""
        seen: list[broker_pb2.BrokerStatus] = []

        def check() -> broker_pb2.BrokerStatus | None:
            st = self.status()
            seen[:] = [st]
            return st if predicate(st) else None

        try:
            return wait_for(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last Status: {seen[0] if seen else None}") from None

    def call(self, method: str, params: Any = None, timeout: float = WAIT) -> broker_pb2.CallReply:
        request = broker_pb2.CallRequest(method=method, params_json=json.dumps(params) if params is not None else "")
        return broker_pb2_grpc.AppServerStub(self.channel).Call(request, timeout=timeout)

    @property
    def app_server(self) -> psutil.Process:
        procs = [p for p in processes_with(self.marker) if p.pid != self.pid]
        assert len(procs) == 1, procs
        return procs[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> list[str]:
        """Stops the broker by its PID (SIGTERM drains; two SIGINTs stop at once; SIGKILL);
        returns the problems found (processes left behind, a broker that ignored signals)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        problems = []
        known = [p for p in processes_with(self.marker)]
        if self.proc.poll() is None:
            steps = ((signal.SIGTERM, 3.0, True), (signal.SIGINT, 0.5, False), (signal.SIGINT, 10.0, True),
                     (signal.SIGKILL, 10.0, True))
            for sig, wait, must_stop in steps:  # a first SIGINT only joins the drain
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    if must_stop:
                        problems.append(f"broker {self.pid} ignored {signal.Signals(sig).name} for {wait:g} s")
            else:
                self.proc.wait()
        left = wait_gone(known + processes_with(self.marker), 5.0)
        for proc in left:
            problems.append(f"process left behind: {proc.pid} {cmdline(proc)}")
            with contextlib.suppress(psutil.Error):
                proc.kill()
        wait_gone(left, 5.0)
        if os.path.lexists(self.dir):
            problems.append(f"socket directory left behind: {self.dir} {os.listdir(self.dir)}")
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


# -- a raw async Session --------------------------------------------------------------------
class RawSession:
    """One AppServer.Session over grpc.aio: sends raw text frames, records every message it
    receives (parsed), and remembers how the RPC ended (``code``, ``details``)."""

    def __init__(self, channel: grpc.aio.Channel):
        self.call = broker_pb2_grpc.AppServerStub(channel).Session()
        self.messages: list[Any] = []
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                self.messages.extend(json.loads(text) for text in frame.messages)
                self._changed.set()
            self.code, self.details = await self.call.code(), await self.call.details()
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code(), exc.details()
        finally:
            self._ended.set()
            self._changed.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def send_text(self, text: str) -> None:
        await self.call.write(broker_pb2.ClientFrame(message=text))

    async def send(self, msg: dict[str, Any]) -> None:
        await self.send_text(json.dumps(msg))

    async def send_request(self, method: str, params: Any = None, req_id: Any = None) -> Any:
        req_id = next(self._ids) if req_id is None else req_id
        await self.send({"id": req_id, "method": method, "params": params if params is not None else {}})
        return req_id

    async def wait_message(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> Any:
        """The first recorded message (from the start) that matches; waits for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for msg in self.messages:
                if predicate(msg):
                    return msg
            if self.ended:
                raise AssertionError(f"Session ended ({self.code}: {self.details}) before a match; "
                                     f"messages: {self.messages[-3:]}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching message within {timeout:g} s; messages: {self.messages[-3:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def response(self, req_id: Any, timeout: float = WAIT) -> dict[str, Any]:
        return await self.wait_message(  # type: ignore[no-any-return]
            lambda m: isinstance(m, dict) and "method" not in m and m.get("id") == req_id
            and type(m.get("id")) is type(req_id), timeout)

    async def request(self, method: str, params: Any = None, timeout: float = WAIT) -> dict[str, Any]:
        return await self.response(await self.send_request(method, params), timeout)

    async def wait_end(self, timeout: float = WAIT) -> grpc.StatusCode | None:
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"Session still open after {timeout:g} s") from None
        return self.code

    async def close(self) -> None:
        """Cancels the RPC (the client goes away) and waits for the reader."""
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


# -- the soak's accounting ------------------------------------------------------------------
class Ledger:
    """Every request id, response, turn and turn/completed the soak's clients saw, thread-safe.

    Session request ids are global (one counter for every Session of every broker), so a
    response counted twice for one id is a duplicate wherever it came from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.sent: dict[int, dict[str, Any]] = {}  # request id -> {method, instance, outcome}
        self.responses: collections.Counter[Any] = collections.Counter()  # request id -> responses received
        self.turns: dict[tuple[str, str], dict[str, Any]] = {}  # (instance, turn id) -> facts
        self.turn_completed: collections.Counter[tuple[str, str]] = collections.Counter()
        self.retryable: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []  # anything that is neither a response nor a retryable error
        self.events: collections.Counter[str] = collections.Counter()

    def note_sent(self, req_id: int, method: str, instance: str) -> None:
        with self.lock:
            self.sent[req_id] = {"method": method, "instance": instance, "outcome": None}

    def note_response(self, req_id: Any) -> None:
        with self.lock:
            self.responses[req_id] += 1
            if req_id not in self.sent:
                self.problems.append(f"response for an id never sent: {req_id!r}")

    def note_turn_completed(self, instance: str, turn_id: Any, status: Any) -> None:
        with self.lock:
            self.turn_completed[(instance, str(turn_id))] += 1

    def outcome(self, req_id: int | None, outcome: str) -> None:
        with self.lock:
            if req_id is not None and req_id in self.sent:
                self.sent[req_id]["outcome"] = outcome

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.events[name] += n

    def retry(self, kind: str) -> None:
        with self.lock:
            self.retryable[kind] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class _IdSource:
    """Hands a Session its request ids from the ledger's global counter and records each one."""

    def __init__(self, session: RecordingSession):
        self._session = session

    def __iter__(self) -> _IdSource:
        return self

    def __next__(self) -> int:
        s = self._session
        req_id = next(s.ledger.ids)
        s.last_id = req_id
        s.ledger.note_sent(req_id, s.next_method, s.instance)
        return req_id


class RecordingSession(LifecycleSession):
    """The lifecycle client's Session, with every received message counted in a Ledger:
    responses by request id, ``turn/completed`` by (broker instance, turn id)."""

    def __init__(self, channel: grpc.Channel, ledger: Ledger, instance: str):
        self.ledger = ledger
        self.instance = instance
        self.last_id: int | None = None
        self.next_method = ""
        super().__init__(broker_pb2_grpc.AppServerStub(channel))
        self._ids = _IdSource(self)  # type: ignore[assignment]

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "method" not in msg and "id" in msg:
            self.ledger.note_response(msg["id"])
        elif msg.get("method") == "turn/completed":
            turn = (msg.get("params") or {}).get("turn") or {}
            self.ledger.note_turn_completed(self.instance, turn.get("id"), turn.get("status"))
        super()._dispatch(msg)

    def tracked_request(self, method: str, params: Any = None, timeout: float | None = 60.0) -> tuple[int | None, Any]:
        """``request`` that also returns the id it used (None: it never left the client)."""
        self.last_id = None
        self.next_method = method
        try:
            result = self.request(method, params, timeout=timeout)
        except BaseException as exc:
            exc.request_id = self.last_id  # type: ignore[attr-defined]
            raise
        return self.last_id, result


# -- another local user -----------------------------------------------------------------------
OTHER_USER = "cxbtest"


def _passwordless_sudo() -> bool:
    if shutil.which("sudo") is None:
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
CONNECT_PROBE = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print(json.dumps({"connected": True}))
except OSError as exc:
    print(json.dumps({"connected": False, "errno": exc.errno, "error": str(exc)}))
"""
GRPC_PROBE = r"""
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos import broker_pb2, broker_pb2_grpc
out = {}
with grpc.insecure_channel(sys.argv[1]) as channel:
    for name, rpc in (("health", lambda: health_pb2_grpc.HealthStub(channel).Check(
                          health_pb2.HealthCheckRequest(), timeout=5)),
                      ("call", lambda: broker_pb2_grpc.AppServerStub(channel).Call(
                          broker_pb2.CallRequest(method="thread/loaded/list"), timeout=5)),
                      ("status", lambda: broker_pb2_grpc.BrokerStub(channel).Status(
                          broker_pb2.StatusRequest(), timeout=5))):
        try:
            rpc()
            out[name] = {"ok": True}
        except grpc.RpcError as exc:
            out[name] = {"ok": False, "code": exc.code().name, "details": exc.details()}
print(json.dumps(out))
"""


class OtherUser:
    """Runs small Python programs as another, unprivileged local user.

    As root: the user is created if missing (no home, no login shell) and programs run with
    its uid/gid and no supplementary groups (Popen user/group/extra_groups: set in C between
    fork and exec). Not root: through passwordless sudo, or ``available`` is False with a
    reason (the caller must fail, not skip)."""

    def __init__(self, name: str = OTHER_USER):
        self.name = name
        self.reason = ""
        self.python: str | None = None
        self.uid = self.gid = -1
        self.sudo = os.geteuid() != 0
        if self.sudo and not _passwordless_sudo():
            self.reason = ("proving that another local user cannot connect needs a second user: run the tests "
                           "as root (as CI does) or with passwordless sudo")
            return
        self._ensure_user()
        if not self.reason:
            self.python = self._find_python()

    @property
    def available(self) -> bool:
        return not self.reason

    def _root(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run((["sudo", "-n"] if self.sudo else []) + argv, capture_output=True, text=True,
                              timeout=60)

    def _ensure_user(self) -> None:
        try:
            entry = pwd.getpwnam(self.name)
        except KeyError:
            done = self._root(["useradd", "--system", "--no-create-home", "--user-group",
                               "--shell", "/usr/sbin/nologin", self.name])
            if done.returncode != 0:
                self.reason = f"could not create user {self.name}: {done.stderr.strip()}"
                return
            entry = pwd.getpwnam(self.name)
        if entry.pw_uid == os.geteuid() or entry.pw_uid == 0:
            self.reason = f"user {self.name} is not a different unprivileged user (uid {entry.pw_uid})"
            return
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", **(env or {})}
        if self.sudo:
            sets = [f"{k}={v}" for k, v in env.items()]
            return subprocess.run(["sudo", "-n", "-u", self.name, "--", "env", "-i", *sets, *argv],
                                  capture_output=True, text=True, timeout=timeout, cwd="/")
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/", env=env,
                              user=self.uid, group=self.gid, extra_groups=[])

    def _find_python(self) -> str | None:
        """An interpreter this user can execute (the venv's may live under an unreadable home)."""
        for candidate in dict.fromkeys([sys.executable, sys._base_executable,  # type: ignore[attr-defined]
                                        "/usr/bin/python3", shutil.which("python3") or ""]):
            try:
                if candidate and self.run([candidate, "-c", "print('ok')"]).stdout.strip() == "ok":
                    return candidate
            except OSError:  # not executable by this user (e.g. under a 0700 home)
                continue
        self.reason = f"no Python interpreter is executable by user {self.name}"
        return None

    def connect(self, path: str) -> dict[str, Any]:
        """A raw connect() to the unix socket ``path`` as this user."""
        assert self.python is not None
        done = self.run([self.python, "-c", CONNECT_PROBE, path])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def grpc_env(self) -> dict[str, str] | None:
        """PYTHONPATH giving this user's interpreter grpcio and the project, if it can import them."""
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(ROOT)}
        env = {"PYTHONPATH": os.pathsep.join(sorted(paths))}
        assert self.python is not None
        done = self.run([self.python, "-c", "import grpc, grpc_health.v1.health_pb2, protos.broker_pb2"], env=env)
        return env if done.returncode == 0 else None

    def grpc_rpcs(self, endpoint: str, env: dict[str, str]) -> dict[str, Any]:
        """Health, Call and Status against ``endpoint`` as this user; each outcome."""
        assert self.python is not None
        done = self.run([self.python, "-c", GRPC_PROBE, endpoint], env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]
