"""Operational workloads: start-up, the ensure reuse path, health of a wedged app-server,
drain-to-exit, and the broker's memory behind a slow reader."""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.clients import SessionClient
from bench.procs import Broker, fake_argv, spawn_direct, stop_direct
from bench.workloads import start_thread, turn_input

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def startup(runs: int) -> dict[str, Any]:
    """Spawn -> first SERVING answer of a fresh broker, and, separately, spawn -> initialize
    answered of the bare fake app-server. The broker spawns its app-server before its own
    imports, so the two overlap: the difference is what the broker adds to its app-server's
    start, and the whole figure (the target's row) is the stricter measure of its own start."""
    app, broker, phases = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        client = await spawn_direct()
        app.append(time.perf_counter() - t0)
        await stop_direct(client)
    for _ in range(runs):
        b = Broker("startup")
        try:
            await b.start()
            broker.append(b.serving_after)
            marks = b.log_times()
            if {"app_server_spawned", "ready"} <= marks.keys():
                phases.append({"to_app_server_spawned_s": marks["app_server_spawned"] - b.spawned_at,
                               "app_server_spawned_to_ready_s": marks["ready"] - marks["app_server_spawned"]})
        finally:
            await b.stop()
    out = {"runs": runs, "broker_to_serving_s": _median(broker), "app_server_start_s": _median(app),
           "broker_excl_app_server_s": _median(broker) - _median(app),
           "broker_samples_s": broker, "app_server_samples_s": app}
    if phases:  # from the broker's log stamps (ms resolution)
        out["broker_phases_s"] = {k: _median([p[k] for p in phases]) for k in phases[0]}
    return out


def _ensure_env(tmp: str) -> dict[str, str]:
    runtime = os.path.join(tmp, "rt")
    os.mkdir(runtime, 0o700)
    return {**os.environ, "CODEX_BROKER_STATE_DIR": os.path.join(tmp, "state"),
            "CODEX_BROKER_RUNTIME_DIR": runtime, "CODEX_BROKER_APP_SERVER": shlex.join(fake_argv())}


def _ensure_sync(calls: int, runs: int) -> dict[str, Any]:
    from lifecycle.ensure import ensure_broker

    tmp = tempfile.mkdtemp(prefix="cxbench", dir="/tmp")
    workspace = os.path.join(tmp, "ws")
    os.mkdir(workspace)
    env = _ensure_env(tmp)
    cli = Path(sys.executable).parent / "codex-broker"
    session = None
    try:
        t0 = time.perf_counter()
        session = ensure_broker(workspace, env=env)
        spawn_s = time.perf_counter() - t0
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            again = ensure_broker(workspace, env=env)
            lat.append(time.perf_counter() - t0)
            assert again.reused and again.pid == session.pid, again
        proc_lat = []
        for _ in range(runs):
            t0 = time.perf_counter()
            done = subprocess.run([str(cli), "ensure", "--cwd", workspace, "--json"], env=env, capture_output=True,
                                  text=True, timeout=30)
            proc_lat.append(time.perf_counter() - t0)
            if done.returncode != 0 or not json.loads(done.stdout)["reused"]:
                raise RuntimeError(f"codex-broker ensure failed or did not reuse: {done.stdout}{done.stderr}")
        q = statistics.quantiles(lat, n=100, method="inclusive")
        return {"first_ensure_spawn_s": spawn_s, "in_process_calls": calls, "in_process_p50_ms": q[49] * 1e3,
                "in_process_p90_ms": q[89] * 1e3, "process_runs": runs,
                "process_p50_ms": _median(proc_lat) * 1e3, "process_samples_ms": [x * 1e3 for x in proc_lat]}
    finally:
        if session is not None:
            _stop_spawned(session)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_spawned(session: Any) -> None:
    """The broker ensure spawned for us: drain it (nothing is in flight), SIGKILL if it lingers."""
    try:
        proc = psutil.Process(session.pid)
    except psutil.NoSuchProcess:
        return
    try:
        with session.client() as client:
            client.drain(0.0, reason="bench done", force=True)
        proc.wait(10)
    except Exception:  # noqa: BLE001 - whatever went wrong, the process must go
        if proc.is_running():
            proc.kill()
            proc.wait(5)


async def ensure(calls: int, runs: int) -> dict[str, Any]:
    return await asyncio.to_thread(_ensure_sync, calls, runs)


async def _watch_until(watch: Any, status: int) -> None:
    while True:
        reply = await watch.read()
        if reply is grpc.aio.EOF:
            raise RuntimeError("the health Watch stream ended")
        if reply.status == status:
            return


async def health_sigstop() -> dict[str, Any]:
    """A Health Watch stream sees SERVING; the app-server gets SIGSTOP: how long until the
    stream says NOT_SERVING (default probe settings), and after SIGCONT until SERVING again."""
    b = await Broker("health").start()
    try:
        async with b.channel() as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            await asyncio.wait_for(_watch_until(watch, SERVING), 10)
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            os.kill(b.app_server_pid, signal.SIGSTOP)
            try:
                await asyncio.wait_for(_watch_until(watch, NOT_SERVING), 30)
                detected = time.perf_counter() - t0
            finally:
                os.kill(b.app_server_pid, signal.SIGCONT)
            t1 = time.perf_counter()
            await asyncio.wait_for(_watch_until(watch, SERVING), 30)
            recovered = time.perf_counter() - t1
            watch.cancel()
        return {"sigstop_to_not_serving_s": detected, "sigcont_to_serving_s": recovered}
    finally:
        await b.stop()


async def drain_exit(turn_seconds: float) -> dict[str, Any]:
    """A turn runs; Drain (default deadline) arrives mid-turn; the clock runs from the client
    receiving turn/completed to the broker process having exited."""
    b = await Broker("drain").start()
    client = None
    try:
        client = await SessionClient.open(b.endpoint)
        await client.initialize()
        thread = await start_thread(client)
        completed = asyncio.get_running_loop().create_future()

        def on_note(method: str, params: dict[str, Any]) -> None:
            if method == "turn/completed" and params.get("threadId") == thread and not completed.done():
                completed.set_result(time.perf_counter())

        client.set_notification_handler(on_note)
        await client.request("turn/start", {"threadId": thread, "input": turn_input(20, turn_seconds)})
        reply = await b.drain()
        t_done = await asyncio.wait_for(completed, turn_seconds + 30)
        code = await b.exited(30)
        t_exit = time.perf_counter()
        session_status, _ = await asyncio.wait_for(client.ended, 5)
        return {"turn_seconds": turn_seconds, "in_flight_turns_at_drain": reply.in_flight_turns,
                "last_turn_to_exit_s": t_exit - t_done, "exit_code": code, "session_ended": session_status}
    finally:
        if client is not None:
            await client.close()
        await b.stop()


# The turn ends with one item/completed carrying the whole text (about 8 bytes per delta); the
# broker's handling of that one big line starts this long before it reaches the other Session.
FINAL_ITEM_GUARD = 0.5


async def slow_reader(deltas: int, read_delay: float, sample_every: float = 0.02, jsonl: bool = False
                      ) -> dict[str, Any]:
    """One client reads a frame (JSONL: 64 KiB) every ``read_delay`` seconds behind a turn of
    ``deltas`` deltas; a second Session (gRPC, deltas opted out) follows the turn to its end.
    Broker RSS is sampled throughout; the broker is expected to drop the slow Session once it
    falls too far behind (gRPC: RESOURCE_EXHAUSTED; JSONL: a last -32001 line, then closed)."""
    b = await Broker("slow-reader-jsonl" if jsonl else "slow-reader", jsonl=jsonl).start()
    slow: Any = None
    watcher = None
    try:
        idle = b.rss_mb()
        slow = (await b.jsonl_client(read_delay) if jsonl
                else await SessionClient.open(b.endpoint, read_delay=read_delay))
        await slow.initialize()
        thread = await start_thread(slow)
        watcher = await SessionClient.open(b.endpoint)
        await watcher.initialize(opt_out=["item/agentMessage/delta"])
        await watcher.request("thread/read", {"threadId": thread})  # subscribes it to the thread
        loop = asyncio.get_running_loop()
        item_done, turn_done = loop.create_future(), loop.create_future()

        item_bytes = []

        def on_watch(method: str, params: dict[str, Any]) -> None:
            if method == "item/completed":
                item_bytes.append(len((params.get("item") or {}).get("text") or ""))
            for name, future in (("item/completed", item_done), ("turn/completed", turn_done)):
                if method == name and not future.done():
                    future.set_result(time.perf_counter())

        watcher.set_notification_handler(on_watch)
        samples: list[tuple[float, float]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter(), b.rss_mb()))
                try:
                    await asyncio.wait_for(stop.wait(), sample_every)
                except TimeoutError:
                    pass

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        await slow.request("turn/start", {"threadId": thread, "input": turn_input(deltas)})
        await asyncio.wait({turn_done, watcher.ended}, timeout=30 + deltas / 50_000,
                           return_when=asyncio.FIRST_COMPLETED)
        if not turn_done.done():
            raise RuntimeError(f"the following Session never saw turn/completed: "
                               f"{watcher.ended.result() if watcher.ended.done() else 'timed out'}")
        seconds = time.perf_counter() - t0
        slow.read_delay = 0.0  # catch up, to see how the stream ended
        status, details = await asyncio.wait_for(slow.ended, 30)
        await asyncio.sleep(0.3)
        stop.set()
        await sampler
        deltas_phase = [rss for t, rss in samples if t < item_done.result() - FINAL_ITEM_GUARD]
        return {"deltas": deltas, "read_delay_s": read_delay, "turn_seconds": seconds, "rss_idle_mb": idle,
                "rss_max_mb": max(rss for _, rss in samples),
                "rss_max_deltas_mb": max(deltas_phase) if deltas_phase else None,
                "rss_after_mb": samples[-1][1], "samples": len(samples),
                "item_completed_text_bytes": item_bytes[0] if item_bytes else None,
                "slow_session_dropped": status in ("RESOURCE_EXHAUSTED", "OVERLOADED"), "slow_session_status": status,
                "slow_session_details": details, "slow_session_messages": slow.messages,
                "series_mb": [[round(t - t0, 3), round(rss, 1)] for t, rss in samples[:: max(1, len(samples) // 300)]]}
    except Exception as exc:
        raise RuntimeError(f"{exc!r}; the broker's log ends with:\n{b.log_tail()}") from exc
    finally:
        for client in (slow, watcher):
            if client is not None:
                await client.close()
        await b.stop()
