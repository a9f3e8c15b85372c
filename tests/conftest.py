"""Fixtures and helpers for the broker integration tests: real broker processes on real unix
sockets, in front of tests/fake_app_server.py.

- ``broker`` (fixture): a factory that starts ``python -m proxy serve`` and returns when the
  gRPC Health Check says SERVING; on teardown each broker is stopped by its PID (SIGTERM, then
  two SIGINTs, then SIGKILL) and the test fails if any of its processes is left behind.
- ``SessionClient``: a small grpc.aio client for one AppServer.Session; tests are plain
  ``def test_x(): run(main())`` functions (no pytest-asyncio).
- Every fake app-server is started with a unique ``--marker=...`` argument (the fake ignores
  unknown arguments), so leaked processes can be found by command line even after they were
  reparented.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proc_support import WAIT, gone, processes_with, wait_for, wait_gone  # noqa: F401 (re-exported)
from proc_support import cmdline as proc_cmdline

from protos import broker_pb2, broker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_app_server.py"
READY_DEADLINE = 20.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def run(coro: Coroutine[Any, Any, Any], timeout: float = 100.0) -> Any:
    """Runs an async test body with an overall deadline (below pytest's 120 s timeout)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def short_dir() -> str:
    """A fresh directory with a short path (unix socket paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix="cxb", dir="/tmp")


def fake_command(*args: str, marker: str) -> str:
    return shlex.join([sys.executable, str(FAKE), f"--marker={marker}", *args])


def new_marker() -> str:
    return f"cxbtest-{uuid.uuid4().hex[:12]}"


# -- processes --------------------------------------------------------------------------
def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0
              ) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m proxy serve ARGS`` to completion (for the CLI error cases)."""
    return subprocess.run([sys.executable, "-m", "proxy", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    """The lines of a broker's stderr that are not its timestamped log records."""
    return [line for line in stderr.splitlines() if line.strip() and " codex-broker[" not in line]


# -- one broker process -----------------------------------------------------------------
class BrokerProcess:
    """A ``python -m proxy serve`` subprocess and sync helpers to talk to it."""

    def __init__(self, *, base: str, log_path: Path, flags: list[str], env: dict[str, str],
                 fake_args: list[str], app_server: str | None, marker: str, via_env: bool = False):
        self.base = base
        self.dir = os.path.join(base, "d")  # fresh: the broker creates it 0700
        self.sock = os.path.join(self.dir, "s.sock")
        self.endpoint = f"unix:{self.sock}"
        self.log_path = log_path
        self.marker = marker
        self.command = app_server if app_server is not None else fake_command(*fake_args, marker=marker)
        argv = [sys.executable, "-m", "proxy", "serve", "--endpoint", self.endpoint, *flags]
        if via_env:  # the command comes from CODEX_BROKER_APP_SERVER instead of --app-server
            env = {**env, "CODEX_BROKER_APP_SERVER": self.command}
        else:
            argv += ["--app-server", self.command]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})
        self.pid = self.proc.pid
        self._channel: grpc.Channel | None = None
        self.known: list[psutil.Process] = []  # the broker's descendants, noted while it lives

    # -- diagnostics ---------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # -- sync RPCs -----------------------------------------------------------------------
    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
        return self._channel

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def status(self, timeout: float = 5.0) -> broker_pb2.BrokerStatus:
        return broker_pb2_grpc.BrokerStub(self.channel).Status(broker_pb2.StatusRequest(), timeout=timeout)

    def drain(self, deadline_seconds: float = 0.0, *, force: bool = False, reason: str = "test",
              timeout: float = 5.0) -> broker_pb2.DrainReply:
        request = broker_pb2.DrainRequest(deadline_seconds=deadline_seconds, force=force, reason=reason)
        return broker_pb2_grpc.BrokerStub(self.channel).Drain(request, timeout=timeout)

    def call(self, method: str, params: Any = None, timeout: float = WAIT) -> broker_pb2.CallReply:
        request = broker_pb2.CallRequest(method=method, params_json=json.dumps(params) if params is not None else "")
        return broker_pb2_grpc.AppServerStub(self.channel).Call(request, timeout=timeout)

    # -- lifecycle -----------------------------------------------------------------------
    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        """Polls Health (short RPC timeout) until SERVING."""
        end = time.monotonic() + deadline
        last: object = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode} before SERVING:\n{self.tail()}")
            if os.path.exists(self.sock):
                # A fresh channel per attempt: a channel that failed to connect backs off.
                with grpc.insecure_channel(self.endpoint) as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                          timeout=0.5)
                        if reply.status == SERVING:
                            self.known = descendants(self.pid)
                            return
                        last = "NOT_SERVING"
                    except grpc.RpcError as exc:
                        last = exc.code()
            time.sleep(0.05)
        raise AssertionError(f"broker not SERVING within {deadline:g} s (last: {last}):\n{self.tail()}")

    @property
    def app_server(self) -> psutil.Process:
        """The fake app-server process (found by its marker)."""
        procs = wait_for(lambda: [p for p in processes_with(self.marker) if p.pid != self.pid],
                         what="the app-server process")
        assert len(procs) == 1, procs
        return procs[0]

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"broker {self.pid} still running after {timeout:g} s:\n{self.tail()}") from None

    def stop_now(self, timeout: float = 15.0) -> int:
        """SIGINT (drain), then once it is draining a second SIGINT (stop at once); the exit code."""
        os.kill(self.pid, signal.SIGINT)
        wait_for(lambda: self.proc.poll() is not None or self.status().state != broker_pb2.BROKER_STATE_SERVING,
                 what="the broker to start draining")
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGINT)
        return self.wait_exit(timeout)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> list[str]:
        """Stops the broker by PID (SIGTERM; SIGINT and a second SIGINT; SIGKILL) and returns problems found."""
        self.close_channel()
        problems = []
        if self.proc.poll() is None:
            self.known += [p for p in descendants(self.pid) if p not in self.known]
            # SIGTERM drains (turns left running by the test may hold it); a second SIGINT stops.
            steps = 0
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGINT, 0.5), (signal.SIGINT, 10.0),
                              (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    if steps > 1:  # the first SIGTERM and SIGINT may legitimately wait for turns
                        problems.append(f"broker {self.pid} still running {wait:g} s after "
                                        f"{'a second SIGINT' if steps == 2 else 'SIGKILL'}")
                    steps += 1
            else:
                self.proc.wait()
        self._log.close()
        if self.proc.returncode in (0, 1) and os.path.exists(self.dir):
            problems.append(f"broker exited {self.proc.returncode} but left {self.dir}: {os.listdir(self.dir)}")
        left = wait_gone(self.known, 5.0)
        left += [p for p in wait_gone(processes_with(self.marker), 5.0) if p not in left]
        for proc in left:
            problems.append(f"process left behind: {proc.pid} {proc_cmdline(proc)}")
            with contextlib.suppress(psutil.Error):
                proc.kill()
        wait_gone(left, 5.0)
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Factory: ``broker(*flags, fake_args=(), env={}, app_server=None, via_env=False, ready=True)``."""
    started: list[BrokerProcess] = []
    counter = itertools.count(1)

    def start(*flags: str, fake_args: tuple[str, ...] | list[str] = (), env: dict[str, str] | None = None,
              app_server: str | None = None, via_env: bool = False, ready: bool = True) -> BrokerProcess:
        b = BrokerProcess(base=short_dir(), log_path=tmp_path / f"broker{next(counter)}.log", flags=list(flags),
                          env=env or {}, fake_args=list(fake_args), app_server=app_server, marker=new_marker(),
                          via_env=via_env)
        started.append(b)
        if ready:
            b.wait_ready()
        return b

    yield start
    problems = []
    for b in started:
        problems += [f"{p}\n--- log of broker {b.pid} ---\n{b.tail()}" for p in b.stop()]
    assert not problems, "\n".join(problems)


# -- async clients ----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def aio_channel(b: BrokerProcess) -> Any:
    async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
        yield channel


def _key(req_id: Any) -> tuple[str, Any]:
    return (type(req_id).__name__, req_id)


def is_response(msg: Any) -> bool:
    return isinstance(msg, dict) and "method" not in msg and ("result" in msg or "error" in msg)


class SessionClient:
    """One AppServer.Session: send JSON dicts, read messages one by one.

    A background task reads every ServerFrame and appends its messages (parsed with Python's
    json, raw text kept too) to ``messages``; ``request`` awaits the response with its id,
    ``until`` consumes messages from a cursor until one matches. ``code``/``details`` hold the
    RPC's final status once the stream has ended."""

    def __init__(self, channel: grpc.aio.Channel, *, read: bool = True):
        self.call = broker_pb2_grpc.AppServerStub(channel).Session()
        self.messages: list[Any] = []
        self.raw: list[str] = []
        self.frames = 0
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self._cursor = 0
        self._ids = itertools.count(1)
        self._responses: dict[tuple[str, Any], asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                self.frames += 1
                for text in frame.messages:
                    msg = json.loads(text)
                    self.raw.append(text)
                    self.messages.append(msg)
                    if is_response(msg) and not isinstance(msg["id"], (dict, list, float)):
                        future = self._responses.pop(_key(msg["id"]), None)
                        if future is not None and not future.done():
                            future.set_result(msg)
                self._changed.set()
            self.code = await self.call.code()
            self.details = await self.call.details()
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code(), exc.details()
        finally:
            self._ended.set()
            self._changed.set()
            for future in self._responses.values():
                if not future.done():
                    future.set_exception(AssertionError(f"stream ended ({self.code}: {self.details})"))

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # -- sending ------------------------------------------------------------------------
    async def send(self, msg: Any) -> None:
        await self.call.write(broker_pb2.ClientFrame(message=msg if isinstance(msg, str) else json.dumps(msg)))

    def new_id(self) -> int:
        return next(self._ids)

    async def send_request(self, method: str, params: Any = None, *, id: Any = None) -> asyncio.Future[Any]:
        req_id = self.new_id() if id is None else id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._responses[_key(req_id)] = future
        msg: dict[str, Any] = {"id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        return future

    async def request(self, method: str, params: Any = None, *, id: Any = None, timeout: float = WAIT) -> Any:
        """Sends a request and returns its whole response message."""
        future = await self.send_request(method, params, id=id)
        return await asyncio.wait_for(future, timeout)

    async def result(self, method: str, params: Any = None, **kw: Any) -> Any:
        """Sends a request and returns its result (fails on an error response)."""
        reply = await self.request(method, params, **kw)
        assert "result" in reply, reply
        return reply["result"]

    async def respond(self, req_id: Any, result: Any = None, error: Any = None) -> None:
        await self.send({"id": req_id, "error": error} if error is not None else {"id": req_id, "result": result})

    async def done_writing(self) -> None:
        await self.call.done_writing()

    # -- codex conveniences ---------------------------------------------------------------
    async def initialize(self, opt_out: list[str] | None = None, name: str = "test-client") -> Any:
        caps: dict[str, Any] = {"experimentalApi": True}
        if opt_out is not None:
            caps["optOutNotificationMethods"] = opt_out
        reply = await self.request("initialize", {"clientInfo": {"name": name, "version": "0"}, "capabilities": caps})
        await self.send({"method": "initialized"})
        return reply

    async def start_thread(self) -> str:
        return (await self.result("thread/start", {"cwd": "/tmp"}))["thread"]["id"]

    async def start_turn(self, thread_id: str, text: str) -> str:
        result = await self.result("turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]})
        return result["turn"]["id"]

    async def turn_completed(self, thread_id: str, turn_id: str | None = None, timeout: float = WAIT) -> Any:
        """Consumes messages until that thread's turn/completed; returns it."""
        found = await self.until(lambda m: is_turn_completed(m, thread_id, turn_id), timeout)
        return found[-1]

    # -- receiving ----------------------------------------------------------------------
    async def until(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> list[Any]:
        """Messages from the cursor up to and including the first one that matches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out: list[Any] = []
        while True:
            while self._cursor < len(self.messages):
                msg = self.messages[self._cursor]
                self._cursor += 1
                out.append(msg)
                if predicate(msg):
                    return out
            if self.ended:
                raise AssertionError(f"stream ended ({self.code}: {self.details}) before a match; "
                                     f"last messages: {out[-3:]}")
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching message within {timeout:g} s; last messages: {out[-3:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def next(self, timeout: float = WAIT) -> Any:
        return (await self.until(lambda m: True, timeout))[-1]

    async def wait_end(self, timeout: float = WAIT) -> grpc.StatusCode | None:
        """Waits for the RPC to end; returns its status code."""
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"Session still open after {timeout:g} s") from None
        return self.code

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> SessionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def next_status(call, want: int, timeout: float) -> float:
    """Reads a Watch stream until it reports ``want``; returns the seconds it took."""
    start = time.monotonic()

    async def read() -> None:
        while True:
            reply = await call.read()
            assert reply is not grpc.aio.EOF, "Watch stream ended"
            if reply.status == want:
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(want)
        raise AssertionError(f"Watch did not report {name} within {timeout:g} s") from None
    return time.monotonic() - start


async def status(channel: grpc.aio.Channel) -> broker_pb2.BrokerStatus:
    return await broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=10)


async def status_until(channel: grpc.aio.Channel, predicate: Callable[[broker_pb2.BrokerStatus], Any],
                       timeout: float = WAIT) -> broker_pb2.BrokerStatus:
    """Polls Status until it matches (the broker's own bookkeeping has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await status(channel)
        if predicate(st):
            return st
        assert time.monotonic() < deadline, f"Status never matched within {timeout:g} s; last:\n{st}"
        await asyncio.sleep(0.05)


def is_turn_completed(msg: Any, thread_id: str, turn_id: str | None = None) -> bool:
    if not (isinstance(msg, dict) and msg.get("method") == "turn/completed"):
        return False
    params = msg.get("params") or {}
    return params.get("threadId") == thread_id and (turn_id is None or params["turn"]["id"] == turn_id)


def notifications(messages: list[Any], method: str) -> list[Any]:
    return [m for m in messages if isinstance(m, dict) and m.get("method") == method and "id" not in m]


def read_request_log(path: Path) -> list[Any]:
    """The JSON messages in a FAKE_LOG_REQUESTS file (blank and bad lines skipped)."""
    out = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def methods_in(log: list[Any]) -> list[str]:
    return [m.get("method") for m in log if isinstance(m, dict) and isinstance(m.get("method"), str)]
