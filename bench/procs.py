"""The processes under test: the fake app-server spoken to directly, and broker processes
(``python -m proxy serve``, the tests' BrokerProcess) in front of the same fake, with its JSONL
front end on a unix socket beside the gRPC one when asked (``Broker(..., jsonl=True)``). Every process
started here is stopped here, by the pid we started (a broker: SIGTERM, SIGINT twice, SIGKILL,
with the tests' checks for anything left behind); the app-server behind a broker dies with it
(parent-death signal).

``CODEX_BROKER_BENCH_PROFILE=cprofile:DIR``, ``pyspy:DIR`` or ``pyspy+native:DIR`` runs every
broker of the run under cProfile or ``py-spy record --format speedscope`` (with C frames), one
file per broker in DIR (the bench only; nothing in proxy/ knows). Pids for memory and signals
always come from Status."""
from __future__ import annotations

import asyncio
import calendar
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.clients import JsonlClient
from protos import broker_pb2, broker_pb2_grpc
from tests.harness import CHANNEL_OPTIONS, FAKE, ROOT, BrokerProcess, short_dir  # noqa: F401 (ROOT re-exported)

PROFILE_ENV = "CODEX_BROKER_BENCH_PROFILE"


def fake_argv() -> list[str]:
    return [sys.executable, str(FAKE)]


def rss_mb(pid: int) -> float:
    """Resident memory of that one process, in MB (10^6 bytes)."""
    return psutil.Process(pid).memory_info().rss / 1e6


async def spawn_direct() -> JsonlClient:
    """The fake app-server on our own pipes, initialized."""
    client = await JsonlClient.spawn(fake_argv(), stderr=asyncio.subprocess.DEVNULL)
    await client.initialize()
    return client


async def stop_direct(client: JsonlClient) -> None:
    await client.close()  # stdin EOF: the fake exits
    assert client.process is not None, "not a spawned client"
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
    """One ``python -m proxy serve`` in front of the fake, in a fresh private directory: the
    tests' broker process (tests/harness.py), started and stopped without blocking the loop."""

    def __init__(self, name: str, flags: list[str] | None = None, jsonl: bool = False):
        self.name = name
        self.base = short_dir("cxbench")
        self.jsonl_path = os.path.join(self.base, "j.sock") if jsonl else None
        self.flags = [*(flags or []), *(["--jsonl-endpoint", f"unix:{self.jsonl_path}"] if jsonl else [])]
        self.process: BrokerProcess | None = None
        self.pid = 0  # the broker itself (from Status), whatever wraps it
        self.app_server_pid = 0
        self.spawned_at = 0.0  # time.time() just before the spawn
        self.serving_after = 0.0  # seconds from spawn to the first SERVING answer

    @property
    def endpoint(self) -> str:
        return f"unix:{os.path.join(self.base, 'd', 's.sock')}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "broker.log")

    async def start(self, timeout: float = 30.0) -> Broker:
        t0 = time.perf_counter()
        self.process = BrokerProcess("--cwd", self.base, *self.flags, base=self.base, log_path=Path(self.log_path),
                                     argv_prefix=_profile_prefix(self.name))
        self.spawned_at = self.process.spawned_at
        await asyncio.to_thread(self.process.wait_ready, timeout)
        self.serving_after = time.perf_counter() - t0
        status = await self.status()
        self.pid, self.app_server_pid = status.pid, status.app_server_pid
        self.process.follow(self.pid)
        return self

    async def exited(self, timeout: float) -> int:
        """Awaits the broker's exit; its exit code."""
        assert self.process is not None
        return await self.process.exited(timeout)

    def log_tail(self, lines: int = 20) -> str:
        return self.process.tail(lines) if self.process is not None else ""

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

    async def jsonl_client(self, read_delay: float = 0.0) -> JsonlClient:
        """One connection to this broker's JSONL front end (started with ``jsonl=True``)."""
        assert self.jsonl_path is not None, "the broker was started without its JSONL front end"
        return await JsonlClient.connect(self.jsonl_path, read_delay=read_delay)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    async def stop(self) -> list[str]:
        """Stopped by its pid (SIGTERM drains; nothing is in flight by now), always reaped; the
        problems found (signals ignored, processes left behind) are printed."""
        if self.process is None:
            shutil.rmtree(self.base, ignore_errors=True)
            return []
        problems = await asyncio.to_thread(self.process.stop)
        for problem in problems:
            print(f"bench: broker {self.name}: {problem}", file=sys.stderr)
        return problems

    async def __aenter__(self) -> Broker:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
