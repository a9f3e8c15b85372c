"""The processes under test: the fake app-server spoken to directly, and broker processes
(``python -m proxy serve``) in front of the same fake. Every process started here is stopped
here, by the pid we started (SIGTERM, then SIGKILL); the app-server behind a broker dies with
it (parent-death signal).

``CODEX_BROKER_BENCH_PROFILE=cprofile:DIR``, ``pyspy:DIR`` or ``pyspy+native:DIR`` runs every
broker of the run under cProfile or ``py-spy record --format speedscope`` (with C frames), one
file per broker in DIR (the bench only; nothing in proxy/ knows). Pids for memory and signals
always come from Status."""
from __future__ import annotations

import asyncio
import calendar
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.clients import CHANNEL_OPTIONS, StdioClient
from protos import broker_pb2, broker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_app_server.py"
PROFILE_ENV = "CODEX_BROKER_BENCH_PROFILE"
SERVING = health_pb2.HealthCheckResponse.SERVING


def fake_argv() -> list[str]:
    return [sys.executable, str(FAKE)]


def rss_mb(pid: int) -> float:
    """Resident memory of that one process, in MB (10^6 bytes)."""
    return psutil.Process(pid).memory_info().rss / 1e6


async def spawn_direct() -> StdioClient:
    """The fake app-server on our own pipes, initialized."""
    client = await StdioClient.spawn(fake_argv(), stderr=asyncio.subprocess.DEVNULL)
    await client.initialize()
    return client


async def stop_direct(client: StdioClient) -> None:
    await client.close()  # stdin EOF: the fake exits
    await _reap(client.process, grace=3.0)


async def _reap(proc: asyncio.subprocess.Process, grace: float) -> None:
    for step in (None, signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        if step is not None:
            try:
                proc.send_signal(step)
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            continue


_profiled = 0


def _profile_prefix(name: str) -> list[str]:
    """argv prefix that runs `-m proxy serve ...` under a profiler, per CODEX_BROKER_BENCH_PROFILE."""
    global _profiled
    spec = os.environ.get(PROFILE_ENV, "")
    if not spec:
        return [sys.executable]
    kind, _, directory = spec.partition(":")
    os.makedirs(directory or ".", exist_ok=True)
    _profiled += 1
    out = os.path.join(directory or ".", f"broker-{_profiled:02d}-{name}")
    if kind == "cprofile":
        return [sys.executable, "-m", "cProfile", "-o", out + ".prof"]
    if kind in ("pyspy", "pyspy+native"):
        pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy"
        native = ["--native"] if kind == "pyspy+native" else []
        return [pyspy, "record", "--format", "speedscope", "--rate", "250", *native, "-o", out + ".json", "--",
                sys.executable]
    raise SystemExit(f"{PROFILE_ENV}: expected cprofile:DIR, pyspy:DIR or pyspy+native:DIR, got {spec!r}")


class Broker:
    """One ``python -m proxy serve`` in front of the fake, in a fresh private directory."""

    def __init__(self, name: str, flags: list[str] | None = None):
        self.name = name
        self.flags = flags or []
        self.base = tempfile.mkdtemp(prefix="cxbench", dir="/tmp")
        self.sock = os.path.join(self.base, "d", "s.sock")
        self.endpoint = f"unix:{self.sock}"
        self.log_path = os.path.join(self.base, "broker.log")
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0  # the broker itself (from Status), whatever wraps it
        self._broker_proc: psutil.Process | None = None
        self.app_server_pid = 0
        self.spawned_at = 0.0  # time.time() just before the spawn
        self.serving_after = 0.0  # seconds from spawn to the first SERVING answer

    async def start(self, timeout: float = 30.0) -> Broker:
        argv = [*_profile_prefix(self.name), "-m", "proxy", "serve", "--endpoint", self.endpoint,
                "--cwd", self.base, "--app-server", shlex.join(fake_argv()), *self.flags]
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230 - a local file, opened once
            self.spawned_at = time.time()
            t0 = time.perf_counter()
            self.proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=log, stderr=log)
        await self._wait_serving(timeout)
        self.serving_after = time.perf_counter() - t0
        status = await self.status()
        self.pid, self.app_server_pid = status.pid, status.app_server_pid
        self._broker_proc = psutil.Process(self.pid)
        return self

    async def _wait_serving(self, timeout: float) -> None:
        """Polls (every 2 ms) for the socket, then Health Check until SERVING."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"broker exited {self.proc.returncode} before SERVING:\n{self.log_tail()}")
            if not os.path.exists(self.sock):  # noqa: ASYNC240 - a local stat, polled every 2 ms on purpose
                await asyncio.sleep(0.002)
                continue
            async with grpc.aio.insecure_channel(self.endpoint) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                while time.monotonic() < deadline:
                    try:
                        reply = await check(health_pb2.HealthCheckRequest(), timeout=1.0)
                        if reply.status == SERVING:
                            return
                    except grpc.RpcError:
                        break  # not listening yet: a fresh channel (a failed one backs off)
                    await asyncio.sleep(0.002)
            await asyncio.sleep(0.002)
        raise TimeoutError(f"broker not SERVING within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_times(self) -> dict[str, float]:
        """Wall times (ms resolution) of the broker's own log lines: the app-server spawned
        ("app-server started ..." or "starting ...; app-server pid=..."), and ready."""
        marks = {"app-server started": "app_server_spawned", "; app-server pid=": "app_server_spawned",
                 "ready endpoint=": "ready"}
        found: dict[str, float] = {}
        for line in Path(self.log_path).read_text(errors="replace").splitlines():
            for text, key in marks.items():
                if text in line and key not in found:
                    stamp = line.split(" ", 1)[0].rstrip("Z")
                    day, _, frac = stamp.partition(".")
                    found[key] = calendar.timegm(time.strptime(day, "%Y-%m-%dT%H:%M:%S")) + int(frac or 0) / 1000
        return found

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)

    async def status(self) -> broker_pb2.BrokerStatus:
        async with self.channel() as channel:
            return await broker_pb2_grpc.BrokerStub(channel).Status(broker_pb2.StatusRequest(), timeout=5.0)

    async def drain(self, deadline_seconds: float = 0.0, force: bool = False) -> broker_pb2.DrainReply:
        request = broker_pb2.DrainRequest(deadline_seconds=deadline_seconds, force=force, reason="bench")
        async with self.channel() as channel:
            return await broker_pb2_grpc.BrokerStub(channel).Drain(request, timeout=5.0)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    async def stop(self) -> int | None:
        """Graceful (SIGTERM drains; nothing is in flight by now), then SIGKILL; always reaped."""
        if self.proc is None:
            return None
        # Under a profiler, self.proc is the wrapper: signal the broker (the wrapper follows it),
        # and at the SIGKILL step the wrapper too. psutil refuses to signal a recycled pid.
        wrapped = self._broker_proc is not None and self.pid != self.proc.pid
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.returncode is not None:
                break
            if wrapped:
                try:
                    self._broker_proc.send_signal(sig)  # type: ignore[union-attr]
                except psutil.NoSuchProcess:
                    pass
            if not wrapped or sig == signal.SIGKILL:
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            try:
                await asyncio.wait_for(self.proc.wait(), wait)
            except TimeoutError:
                continue
        shutil.rmtree(self.base, ignore_errors=True)
        return self.proc.returncode

    async def __aenter__(self) -> Broker:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
