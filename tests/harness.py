"""The one test harness: broker processes and async Session clients, shared by the tests and
the bench (``from tests.harness import ...`` from the project root; ``from harness import
...`` in test modules: pytest puts both the root and tests/ on sys.path).

- ``BrokerProcess``: one ``python -m proxy serve`` subprocess in a fresh short directory, in
  front of tests/fake_app_server.py (or any ``--app-server`` command). ``wait_ready`` returns
  when its Health Watch says SERVING: the Watch waits for the socket itself (wait_for_ready on
  a channel that reconnects every few ms) and a thread cancels it the moment the process
  exits, so nothing polls. Sync helpers health/status/drain/call; ``stop()`` stops it by the
  PID we started (SIGTERM drains; SIGINT joins the drain; a second SIGINT stops at once;
  SIGKILL) and returns every problem found: a broker that ignored its signals, a socket
  directory left by a broker that exited on its own terms, any process left behind (found by
  the unique ``--marker=...`` argument the fake ignores, and among the broker's descendants).
- ``SessionClientBase``: the transport-neutral half of an async JSON-RPC Session client: a
  reader task, every message recorded (parsed, raw text kept), request/response by id,
  notifications, a cursor (``until``/``next``) and a whole-history search (``wait_message``),
  how the stream ended, frame and message counters, an optional read delay (a slow reader).
  A transport provides ``_write_text``, ``_read_batch``, ``_cancel`` and ``done_writing``.
- ``SessionClient``: that client over one grpc.aio ``AppServer.Session``; ``LinesSession``: the
  same over JSON lines on a byte stream (pipes, a unix socket), with raw bytes (``send_bytes``)
  and half-close (``done_writing``); ``JsonlSession``: a LinesSession on one connection to the
  broker's JSONL front end (``await JsonlSession.connect(path)``, a broker started with
  ``jsonl_flags(path)``) that holds the broker to its framing (every line a JSON object ending in
  a newline, kept in ``lines``) and says how the broker ended the connection (``code``
  "closed" or "reset"). ``connect_only`` is the companion's readiness check on that socket.

Tests are plain ``def test_x(): run(main())`` functions (no pytest-asyncio).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import broker_pb2, broker_pb2_grpc
from tests.proc_support import WAIT, cmdline, gone, processes_with, wait_for, wait_gone  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_app_server.py"
READY_DEADLINE = 20.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# The ready Watch's channel retries the (not yet bound) socket every few ms instead of gRPC's
# default 1 s backoff, so SERVING is seen within milliseconds of the broker binding.
READY_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 2), ("grpc.max_reconnect_backoff_ms", 10)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EndCode = TypeVar("EndCode")  # how a transport says the stream ended: gRPC's StatusCode, a str
JSONL_NAME = "broker.sock"  # as the companion names its socket in its own directory
JSONL_READ_LIMIT = 1 << 28  # the longest line a JsonlSession reads: 256 MiB


# -- small facts ----------------------------------------------------------------------------
def run(coro: Coroutine[Any, Any, Any], timeout: float = 100.0) -> Any:
    """Runs an async test body with an overall deadline (below pytest's 120 s timeout)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def short_dir(prefix: str = "cxb") -> str:
    """A fresh directory with a short path (unix socket paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def new_marker() -> str:
    return f"cxbtest-{uuid.uuid4().hex[:12]}"


def fake_command(*args: str, marker: str | None = None) -> str:
    """The fake app-server's command line (shell-style), tagged with ``marker`` if given."""
    tag = [f"--marker={marker}"] if marker is not None else []
    return shlex.join([sys.executable, str(FAKE), *tag, *args])


def health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def open_fds() -> list[str]:
    """What the test process's descriptors point at (for counting and for diagnostics)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue  # the descriptor listdir itself used
    return out


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


def wait_serving(endpoint: str, proc: subprocess.Popen[bytes], timeout: float, log_tail: Callable[[], str]) -> None:
    """Returns when the broker's Health Watch says SERVING; fails at once if the process exits.

    The Watch waits for the socket to appear (wait_for_ready), and a thread cancels it the moment
    the process exits (its pidfd turns readable), so nothing here is a sleep."""
    with grpc.insecure_channel(endpoint, options=READY_CHANNEL_OPTIONS) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=timeout, wait_for_ready=True)
        with on_exit(proc, call.cancel):
            try:
                for reply in call:
                    if reply.status == SERVING:
                        call.cancel()
                        return
            except grpc.RpcError as exc:
                raise AssertionError(f"broker not SERVING within {timeout:g} s (exit status {proc.poll()}, "
                                     f"{exc.code().name}):\n{log_tail()}") from None
    raise AssertionError(f"broker health watch ended before SERVING:\n{log_tail()}")


@contextlib.contextmanager
def on_exit(proc: subprocess.Popen[bytes], callback: Callable[[], Any]) -> Iterator[None]:
    """Calls ``callback`` (from a thread) if ``proc`` exits before the block ends.

    The thread waits on the process's pidfd and on a pipe closed at the end of the block; it only
    watches (it never reaps, so the Popen keeps its exit status)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # already gone (and reaped)
        callback()
        yield
        return
    stop_r, stop_w = os.pipe()

    def watch() -> None:
        if pidfd in select.select([pidfd, stop_r], [], [])[0]:
            callback()

    thread = threading.Thread(target=watch, name="serve-exit-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        os.close(stop_w)
        thread.join()
        os.close(stop_r)
        os.close(pidfd)


# -- one broker process -----------------------------------------------------------------------
class BrokerProcess:
    """A ``python -m proxy serve`` subprocess and sync helpers to talk to it.

    ``argv_prefix`` replaces the interpreter (the bench runs brokers under a profiler);
    ``term_must_stop``: a broker still running 3 s after SIGTERM is a problem (when the test
    leaves no turn running for the drain to wait on)."""

    def __init__(self, *flags: str, fake_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 app_server: str | None = None, via_env: bool = False, marker: str | None = None,
                 log_path: Path | None = None, base: str | None = None, argv_prefix: Sequence[str] = (),
                 term_must_stop: bool = False):
        self.base = base if base is not None else short_dir()
        self.dir = os.path.join(self.base, "d")  # fresh: the broker creates it 0700
        self.sock = os.path.join(self.dir, "s.sock")
        self.endpoint = f"unix:{self.sock}"
        self.log_path = log_path if log_path is not None else Path(self.base) / "broker.log"
        self.marker = marker if marker is not None else new_marker()
        self.term_must_stop = term_must_stop
        self.command = app_server if app_server is not None else fake_command(*fake_args, marker=self.marker)
        env = dict(env or {})
        argv = [*(argv_prefix or [sys.executable]), "-m", "proxy", "serve", "--endpoint", self.endpoint, *flags]
        if via_env:  # the command comes from CODEX_BROKER_APP_SERVER instead of --app-server
            env["CODEX_BROKER_APP_SERVER"] = self.command
        else:
            argv += ["--app-server", self.command]
        self.spawned_at = time.time()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env={**os.environ, **env})
        self.pid = self.proc.pid  # the broker itself; see follow()
        self._wrapped: psutil.Process | None = None
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

    def health_name(self, timeout: float = 5.0) -> str:
        """The overall Health Check status, by name ("SERVING")."""
        return health_name(self.health(timeout=timeout))

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

    def drain(self, deadline_seconds: float = 0.0, *, force: bool = False, reason: str = "test",
              timeout: float = 5.0) -> broker_pb2.DrainReply:
        request = broker_pb2.DrainRequest(deadline_seconds=deadline_seconds, force=force, reason=reason)
        return broker_pb2_grpc.BrokerStub(self.channel).Drain(request, timeout=timeout)

    def call(self, method: str, params: Any = None, timeout: float = WAIT) -> broker_pb2.CallReply:
        request = broker_pb2.CallRequest(method=method, params_json=json.dumps(params) if params is not None else "")
        return broker_pb2_grpc.AppServerStub(self.channel).Call(request, timeout=timeout)

    # -- lifecycle -----------------------------------------------------------------------
    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        """Returns when the Health Watch says SERVING (fails at once if the broker exits)."""
        wait_serving(self.endpoint, self.proc, deadline, self.tail)
        self.known = descendants(self.pid)

    @property
    def app_server(self) -> psutil.Process:
        """The fake app-server process (found by its marker)."""
        procs = wait_for(lambda: [p for p in processes_with(self.marker) if p.pid != self.pid],
                         what="the app-server process")
        assert len(procs) == 1, procs
        return procs[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def follow(self, pid: int) -> None:
        """The broker is ``pid``, run by the process we started (a profiler): signals go to it,
        and SIGKILL to both."""
        if pid != self.proc.pid:
            self.pid, self._wrapped = pid, psutil.Process(pid)

    async def exited(self, timeout: float = WAIT) -> int:
        """Awaits the exit of the process we started (its pidfd turns readable: no polling); the exit code."""
        if self.proc.poll() is None:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            try:
                def settle() -> None:
                    if not done.done():
                        done.set_result(None)

                with on_exit(self.proc, lambda: loop.call_soon_threadsafe(settle)):
                    await asyncio.wait_for(done, timeout)
            except TimeoutError:
                raise AssertionError(f"broker {self.pid} still running after {timeout:g} s:\n{self.tail()}") from None
        return self.proc.wait()

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

    def _signal_until_exit(self) -> list[str]:
        """SIGTERM drains (turns left running may hold it); a first SIGINT only joins the drain,
        a second one stops at once; SIGKILL last. The problems: signals the broker ignored."""
        problems: list[str] = []
        steps = ((signal.SIGTERM, 3.0, self.term_must_stop), (signal.SIGINT, 0.5, False),
                 (signal.SIGINT, 10.0, True), (signal.SIGKILL, 10.0, True))
        for sig, wait, must_stop in steps:
            self._send(sig)
            try:
                self.proc.wait(wait)
                return problems
            except subprocess.TimeoutExpired:
                if must_stop:
                    problems.append(f"broker {self.pid} still running {wait:g} s after {signal.Signals(sig).name}")
        self.proc.wait()
        return problems

    def _send(self, sig: int) -> None:
        if self._wrapped is not None:
            with contextlib.suppress(psutil.NoSuchProcess):  # psutil refuses a recycled pid
                self._wrapped.send_signal(sig)
        if self._wrapped is None or sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self) -> list[str]:
        """Stops the broker by its PID and returns the problems found (see the module docstring)."""
        self.close_channel()
        problems = []
        self.known += [p for p in processes_with(self.marker) if p not in self.known]
        if self.proc.poll() is None:
            self.known += [p for p in descendants(self.pid) if p not in self.known]
            problems += self._signal_until_exit()
        if self.proc.returncode in (0, 1) and os.path.lexists(self.dir):
            problems.append(f"broker exited {self.proc.returncode} but left {self.dir}: {os.listdir(self.dir)}")
        left = wait_gone(self.known, 5.0)
        left += [p for p in wait_gone(processes_with(self.marker), 5.0) if p not in left]
        for proc in left:
            problems.append(f"process left behind: {proc.pid} {cmdline(proc)}")
            with contextlib.suppress(psutil.Error):
                proc.kill()
        wait_gone(left, 5.0)
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


def serve(*flags: str, ready_timeout: float = READY_DEADLINE, term_must_stop: bool = True,
          **kw: Any) -> BrokerProcess:
    """A BrokerProcess that is SERVING (stopped again if it never gets there)."""
    b = BrokerProcess(*flags, term_must_stop=term_must_stop, **kw)
    try:
        b.wait_ready(ready_timeout)
    except BaseException:
        b.stop()
        raise
    return b


# -- async clients ----------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def aio_channel(b: BrokerProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(b.endpoint, options=CHANNEL_OPTIONS) as channel:
        yield channel


def _key(req_id: Any) -> tuple[str, Any]:
    return (type(req_id).__name__, req_id)


def is_response(msg: Any) -> bool:
    return isinstance(msg, dict) and "method" not in msg and ("result" in msg or "error" in msg)


def is_response_to(msg: Any, req_id: Any) -> bool:
    """A response (or error reply) with exactly that id (1 and True and 1.0 are different ids)."""
    return isinstance(msg, dict) and "method" not in msg and msg.get("id") == req_id \
        and type(msg.get("id")) is type(req_id)


class SessionClientBase(Generic[EndCode]):
    """One JSON-RPC Session, whatever carries it: send JSON dicts or raw text, read messages.

    A reader task receives every batch of messages (a frame) and records each one (parsed with
    Python's json, raw text kept) in ``messages``/``raw``, unless ``record`` is False (the
    bench: counters and callbacks only); ``request`` awaits the response with its id;
    ``until`` consumes messages from a cursor until one matches, ``wait_message`` searches the
    whole history. ``on_message`` sees every message as it arrives. ``code``/``details`` hold
    the final status once the stream has ended; ``read_delay`` > 0 makes a slow reader (it
    sleeps that long after every frame)."""

    def __init__(self, *, read: bool = True, record: bool = True, read_delay: float = 0.0,
                 on_message: Callable[[Any], None] | None = None):
        self.messages: list[Any] = []
        self.raw: list[str] = []
        self.frames = 0
        self.received = 0  # messages, recorded or not
        self.record = record
        self.read_delay = read_delay
        self.on_message = on_message
        self.code: EndCode | None = None
        self.details: str | None = None
        self._cursor = 0
        self._ids = itertools.count(1)
        self._responses: dict[tuple[str, Any], asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        if read:
            self.start_reading()

    # -- to be provided by a transport ---------------------------------------------------
    async def _write_text(self, text: str) -> None:
        raise NotImplementedError

    async def _read_batch(self) -> Sequence[str] | None:
        """The next batch of message texts; None once the stream ended (``code``/``details`` set)."""
        raise NotImplementedError

    def _cancel(self) -> None:
        raise NotImplementedError

    async def done_writing(self) -> None:
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------
    def start_reading(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while (batch := await self._read_batch()) is not None:
                self.frames += 1
                self.received += len(batch)
                for text in batch:
                    self._deliver(text, json.loads(text))
                self._changed.set()
                if self.read_delay:
                    await asyncio.sleep(self.read_delay)
        finally:
            self._ended.set()
            self._changed.set()
            for future in self._responses.values():
                if not future.done():
                    future.set_exception(AssertionError(f"stream ended ({self.code}: {self.details})"))

    def _deliver(self, text: str, msg: Any) -> None:
        if self.record:
            self.raw.append(text)
            self.messages.append(msg)
        if self._responses and is_response(msg) and not isinstance(msg["id"], (dict, list, float)):
            future = self._responses.pop(_key(msg["id"]), None)
            if future is not None and not future.done():
                future.set_result(msg)
        if self.on_message is not None:
            self.on_message(msg)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # -- sending ------------------------------------------------------------------------
    async def send_text(self, text: str) -> None:
        await self._write_text(text)

    async def send(self, msg: Any) -> None:
        """A dict is sent as JSON, a str as it is."""
        await self._write_text(msg if isinstance(msg, str) else json.dumps(msg))

    def new_id(self) -> int:
        return next(self._ids)

    async def send_request(self, method: str, params: Any = None, *, id: Any = None) -> asyncio.Future[Any]:
        """Sends a request (``params`` left out when None); the future of its response message."""
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

    async def notify(self, method: str, params: Any = None) -> None:
        await self.send({"method": method} if params is None else {"method": method, "params": params})

    async def respond(self, req_id: Any, result: Any = None, error: Any = None) -> None:
        await self.send({"id": req_id, "error": error} if error is not None else {"id": req_id, "result": result})

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
    async def _wait_changed(self, deadline: float, timeout: float, last: list[Any]) -> None:
        if self.ended:
            raise AssertionError(f"stream ended ({self.code}: {self.details}) before a match; "
                                 f"last messages: {last[-3:]}")
        self._changed.clear()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"no matching message within {timeout:g} s; last messages: {last[-3:]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), remaining)

    async def until(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> list[Any]:
        """Messages from the cursor up to and including the first one that matches."""
        deadline = asyncio.get_running_loop().time() + timeout
        out: list[Any] = []
        while True:
            while self._cursor < len(self.messages):
                msg = self.messages[self._cursor]
                self._cursor += 1
                out.append(msg)
                if predicate(msg):
                    return out
            await self._wait_changed(deadline, timeout, out)

    async def next(self, timeout: float = WAIT) -> Any:
        return (await self.until(lambda m: True, timeout))[-1]

    async def wait_message(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> Any:
        """The first recorded message (from the start, whatever the cursor) that matches; waits for it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for msg in self.messages:
                if predicate(msg):
                    return msg
            await self._wait_changed(deadline, timeout, self.messages)

    async def response(self, request: Any, timeout: float = WAIT) -> dict[str, Any]:
        """The response to ``request``: the future ``send_request`` returned, or a request id
        (then any message so far or later with exactly that id)."""
        if isinstance(request, asyncio.Future):
            return await asyncio.wait_for(request, timeout)
        return await self.wait_message(lambda m: is_response_to(m, request), timeout)

    async def wait_end(self, timeout: float | None = WAIT) -> EndCode | None:
        """Waits for the stream to end (None: however long it takes); returns its status code."""
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"Session still open after {timeout:g} s") from None
        return self.code

    async def close(self) -> None:
        """Cancels the stream (the client goes away) and waits for the reader."""
        self._cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SessionClient(SessionClientBase[grpc.StatusCode]):
    """The Session client over one grpc.aio ``AppServer.Session`` (``call`` is the RPC)."""

    def __init__(self, channel: grpc.aio.Channel, **kw: Any):
        self.call = broker_pb2_grpc.AppServerStub(channel).Session()
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight per call
        super().__init__(**kw)

    async def _write_text(self, text: str) -> None:
        async with self._write_lock:
            await self.call.write(broker_pb2.ClientFrame(message=text))

    async def _read_batch(self) -> Sequence[str] | None:
        try:
            frame = await self.call.read()
            if isinstance(frame, broker_pb2.ServerFrame):  # else grpc.aio.EOF
                return frame.messages
            self.code = await self.call.code()
            self.details = await self.call.details()
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code(), exc.details()
        return None

    def _cancel(self) -> None:
        self.call.cancel()

    async def done_writing(self) -> None:
        await self.call.done_writing()


class LinesSession(SessionClientBase[str]):
    """The Session client over JSON lines on a byte stream (a subprocess's pipes, a unix
    socket: ``LinesSession(*await asyncio.open_unix_connection(path))``). One line is one
    message and one batch; blank lines are skipped; the end of the stream leaves ``code`` None.
    ``send_bytes`` writes bytes as they are (any framing, or none); a str is sent as UTF-8 with
    its lone surrogates kept (``surrogatepass``), so a test can send what JSON cannot."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **kw: Any):
        self._in, self._out = reader, writer
        super().__init__(**kw)

    async def send_bytes(self, data: bytes) -> None:
        self._out.write(data)
        await self._out.drain()

    async def _write_text(self, text: str) -> None:
        await self.send_bytes(text.encode("utf-8", "surrogatepass") + b"\n")

    async def _read_batch(self) -> Sequence[str] | None:
        while line := await self._in.readline():
            if line.strip():
                return [line.decode()]
        self.details = "end of stream"
        return None

    def _cancel(self) -> None:
        self._out.close()
        if self._reader is not None:
            self._reader.cancel()

    async def done_writing(self) -> None:
        """Half-closes the stream (the companion's ``end()``); reading goes on."""
        if self._out.can_write_eof():
            self._out.write_eof()

    async def close(self) -> None:
        """Closes our end (and waits until it is closed), then stops the reader."""
        self._out.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._out.wait_closed()
        await super().close()


class JsonlSession(LinesSession):
    """A LinesSession on one connection to the broker's JSONL front end, holding the broker to
    its framing: every line it writes ends with a newline and is one JSON object (a blank line,
    a last line cut short or anything else fails the reader, and ``close`` raises it); each
    line is kept as written, without its newline, in ``lines``. ``code`` is "closed" once the
    broker closed the connection, "reset" (``details`` says why) if the connection failed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **kw: Any):
        self.lines: list[bytes] = []
        super().__init__(reader, writer, **kw)

    @classmethod
    async def connect(cls, path: str, **kw: Any) -> Self:
        """One connection to the JSONL socket at ``path`` (one Session of the broker)."""
        return cls(*await asyncio.open_unix_connection(path, limit=JSONL_READ_LIMIT), **kw)

    async def _read_batch(self) -> Sequence[str] | None:
        try:
            line = await self._in.readline()
        except (ConnectionError, OSError) as exc:
            self.code, self.details = "reset", repr(exc)
            return None
        if not line:
            self.code = "closed"
            return None
        assert line.endswith(b"\n"), f"a last line without its newline: {line[:200]!r}"
        self.lines.append(line[:-1])
        return [line[:-1].decode()]

    def _deliver(self, text: str, msg: Any) -> None:
        assert isinstance(msg, dict), text[:200]
        super()._deliver(text, msg)


def jsonl_flags(path: str) -> list[str]:
    """The serve flags for a JSONL front end at ``path``."""
    return ["--jsonl-endpoint", f"unix:{path}"]


def jsonl_path(directory: str) -> str:
    return os.path.join(directory, JSONL_NAME)


def connect_only(path: str, timeout: float = 5.0) -> bytes:
    """The companion's readiness check: connect, half-close at once, wait for the broker to
    close; returns what the broker wrote (nothing, for a well-behaved broker)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


# -- status and message helpers ---------------------------------------------------------------
async def next_status(call: Any, want: int, timeout: float) -> float:
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
        raise AssertionError(f"Watch did not report {health_name(want)} within {timeout:g} s") from None
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
    out: list[Any] = []
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
    return [m["method"] for m in log if isinstance(m, dict) and isinstance(m.get("method"), str)]
