"""The plan of one run: which workloads, with which counts, in which order, against which
processes; progress lines on stderr; one results dict. A step that fails is recorded as
``{"error": ...}`` and the run goes on (the exit status says so)."""
from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from bench import ops, workloads
from bench.clients import CallClient, SessionClient
from bench.procs import Broker, rss_mb, spawn_direct, stop_direct

STEPS = ("startup", "unary", "stream", "stream4", "concurrent", "ensure", "health", "drain", "slow_reader",
         "slow_reader_jsonl")
TRAFFIC = ("unary", "stream", "stream4", "concurrent")
STEP_TIMEOUT = 900.0
Work = Callable[[], Awaitable[dict[str, Any]]]
Show = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Counts:
    requests: int = 2000
    warmup: int = 200
    deltas: int = 50_000
    clients: int = 16
    per_client: int = 200
    fanout: int = 4
    start_runs: int = 5
    ensure_calls: int = 300
    ensure_runs: int = 10
    drain_turn_seconds: float = 1.0
    slow_deltas: int = 3_000_000
    slow_read_delay: float = 0.05
    reps: int = 5  # each traffic workload, alternating direct / broker


QUICK = Counts(requests=200, warmup=50, deltas=5_000, per_client=20, start_runs=2, ensure_calls=30, ensure_runs=3,
               drain_turn_seconds=0.3, slow_deltas=300_000, reps=1)


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, counts: Counts, steps: tuple[str, ...]):
        self.counts = counts
        self.steps = steps
        self.results: dict[str, Any] = {"config": asdict(counts), "steps": list(steps), "memory": {}}
        self.failed: list[str] = []
        self._cpu: dict[str, psutil.Process] = {}

    async def step(self, name: str, what: str, work: Work, summary: Show) -> dict[str, Any]:
        progress(f"{what} ...")
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(work(), STEP_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - recorded, reported, and the run goes on
            progress(f"{what}: FAILED: {exc!r}")
            self.failed.append(name)
            return {"error": repr(exc)}
        progress(f"{what}: {summary(result)} ({time.perf_counter() - t0:.1f} s)")
        return result

    async def run(self) -> dict[str, Any]:
        c, r = self.counts, self.results
        if "startup" in self.steps:
            r["startup"] = await self.step("startup", f"start to SERVING ({c.start_runs} brokers, {c.start_runs} bare "
                                           "app-servers)", lambda: ops.startup(c.start_runs),
                                           lambda x: f"broker {x['broker_to_serving_s'] * 1e3:.0f} ms, app-server "
                                                     f"{x['app_server_start_s'] * 1e3:.0f} ms")
        if any(s in self.steps for s in TRAFFIC):
            try:
                await self.traffic()
            except Exception as exc:  # noqa: BLE001 - the processes did not start or stop: recorded
                progress(f"traffic workloads: FAILED: {exc!r}")
                self.failed.append("traffic")
                for name in TRAFFIC:
                    r.setdefault(name, {"error": repr(exc)})
        if "ensure" in self.steps:
            r["ensure"] = await self.step("ensure", f"ensure reuse ({c.ensure_calls} in process, {c.ensure_runs} "
                                          "processes)", lambda: ops.ensure(c.ensure_calls, c.ensure_runs),
                                          lambda x: f"in process p50 {x['in_process_p50_ms']:.2f} ms, "
                                                    f"process p50 {x['process_p50_ms']:.0f} ms")
        if "health" in self.steps:
            r["health"] = await self.step("health", "SIGSTOP the app-server, wait for NOT_SERVING", ops.health_sigstop,
                                          lambda x: f"{x['sigstop_to_not_serving_s']:.2f} s")
        if "drain" in self.steps:
            r["drain"] = await self.step("drain", "drain during a turn, wait for the exit",
                                         lambda: ops.drain_exit(c.drain_turn_seconds),
                                         lambda x: f"exit {x['last_turn_to_exit_s'] * 1e3:.0f} ms after turn/completed")
        if "slow_reader" in self.steps:
            r["memory"]["slow_reader"] = await self.step(
                "slow_reader", f"slow reader behind a {c.slow_deltas:,}-delta turn",
                lambda: ops.slow_reader(c.slow_deltas, c.slow_read_delay),
                lambda x: f"max RSS {x['rss_max_mb']:.1f} MB, slow Session {x['slow_session_status']}")
        if "slow_reader_jsonl" in self.steps:
            r["memory"]["slow_reader_jsonl"] = await self.step(
                "slow_reader_jsonl", f"slow JSONL reader behind a {c.slow_deltas:,}-delta turn",
                lambda: ops.slow_reader(c.slow_deltas, c.slow_read_delay, jsonl=True),
                lambda x: f"max RSS {x['rss_max_mb']:.1f} MB, slow JSONL Session {x['slow_session_status']}")
        return r

    async def traffic(self) -> None:
        """The direct fake and one broker side by side; each workload alternates between them,
        ``reps`` times, and keeps the median of every figure (latency samples are pooled)."""
        progress("starting the direct fake app-server and a broker")
        direct = await spawn_direct()
        broker = await Broker("traffic", jsonl=True).start()
        mem = self.results["memory"]
        mem["idle_mb"] = broker.rss_mb()
        assert direct.process is not None
        self._cpu = {"direct": psutil.Process(direct.process.pid), "broker": psutil.Process(broker.pid),
                     "broker_app_server": psutil.Process(broker.app_server_pid)}
        try:
            for name in TRAFFIC:
                if name in self.steps:
                    self.results[name] = await getattr(self, f"_{name}")(direct, broker)
            mem["app_server_mb"] = rss_mb(broker.app_server_pid)
        finally:
            await stop_direct(direct)
            await broker.stop()

    async def compare(self, name: str, variants: dict[str, tuple[str, Work]], show: Show) -> dict[str, Any]:
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in variants}
        reps = self.counts.reps
        for rep in range(reps):
            for label, (what, work) in variants.items():
                before, client = self._cpu_seconds(), time.process_time()
                result = await self.step(name, f"{what} [{rep + 1}/{reps}]", work, show)
                after, client = self._cpu_seconds(), time.process_time() - client
                direct = label.endswith("direct")
                app = "direct" if direct else "broker_app_server"
                result.update(cpu_client_s=client, cpu_app_server_s=after[app] - before[app],
                              cpu_broker_s=0.0 if direct else after["broker"] - before["broker"])
                runs[label].append(result)
        return {label: combine(results) for label, results in runs.items()}

    def _cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of each process under test."""
        return {name: sum(proc.cpu_times()[:2]) for name, proc in self._cpu.items()}

    async def _unary(self, direct: Any, broker: Broker) -> dict[str, Any]:
        c = self.counts

        def show(x: dict[str, Any]) -> str:
            return f"p50 {x['p50_us']:.0f} us, p99 {x['p99_us']:.0f} us"

        session = await SessionClient.open(broker.endpoint)
        call = CallClient.open(broker.endpoint)
        jsonl = await broker.jsonl_client()
        try:
            await session.initialize()
            await jsonl.initialize()
            return await self.compare("unary", {
                label: (f"unary {what} ({c.requests} requests)",
                        lambda client=client: workloads.unary(client, c.requests, c.warmup))  # type: ignore[misc]
                for label, what, client in (("direct", "direct", direct), ("session", "over a Session", session),
                                            ("call", "over Call", call), ("jsonl", "over JSONL", jsonl))}, show)
        finally:
            await session.close()
            await call.close()
            await jsonl.close()

    async def _stream(self, direct: Any, broker: Broker) -> dict[str, Any]:
        c = self.counts

        def show(x: dict[str, Any]) -> str:
            return f"{x['notes_per_s']:,.0f} notifications/s"

        async def one_turn(client: Any) -> dict[str, Any]:
            thread = await workloads.start_thread(client)
            return await workloads.stream([(client, thread)], [(client, thread)], c.deltas)

        session = await SessionClient.open(broker.endpoint)
        jsonl = await broker.jsonl_client()
        try:
            await session.initialize()
            await jsonl.initialize()
            out = await self.compare("stream", {
                "direct": (f"stream direct ({c.deltas:,} deltas)", lambda: one_turn(direct)),
                "session": (f"stream over a Session ({c.deltas:,} deltas)", lambda: one_turn(session)),
                "jsonl": (f"stream over JSONL ({c.deltas:,} deltas)", lambda: one_turn(jsonl))}, show)
        finally:
            await session.close()
            await jsonl.close()
        self.results["memory"]["after_stream_mb"] = broker.rss_mb()
        return out

    async def _stream4(self, direct: Any, broker: Broker) -> dict[str, Any]:
        """Fan-out: N Sessions subscribed to one thread, one turn. Turns: N concurrent turns,
        one per client and thread (the direct peer runs them over its one pipe)."""
        c, n = self.counts, self.counts.fanout

        def show(x: dict[str, Any]) -> str:
            return f"{x['notes_per_s']:,.0f} notifications/s delivered in all"

        async def fanout() -> dict[str, Any]:
            thread = await workloads.start_thread(sessions[0])
            for s in sessions[1:]:
                await s.request("thread/read", {"threadId": thread})  # subscribes it to the thread
            return await workloads.stream([(s, thread) for s in sessions], [(sessions[0], thread)], c.deltas)

        async def turns(clients: list[Any]) -> dict[str, Any]:
            pairs = [(client, await workloads.start_thread(client)) for client in clients]
            return await workloads.stream(pairs, pairs, c.deltas)

        sessions = [await SessionClient.open(broker.endpoint) for _ in range(n)]
        try:
            await asyncio.gather(*(s.initialize() for s in sessions))
            return await self.compare("stream4", {
                "fanout_session": (f"fan-out: {n} Sessions on one thread, one turn of {c.deltas:,} deltas", fanout),
                "turns_direct": (f"{n} concurrent turns direct ({c.deltas:,} deltas each)",
                                 lambda: turns([direct] * n)),
                "turns_session": (f"{n} concurrent turns, one per Session ({c.deltas:,} deltas each)",
                                  lambda: turns(sessions))}, show)
        finally:
            for s in sessions:
                await s.close()

    async def _concurrent(self, direct: Any, broker: Broker) -> dict[str, Any]:
        c = self.counts

        def show(x: dict[str, Any]) -> str:
            return f"{x['served']}/{x['attempted']} served, {x['refused']} refused, {x['rps']:,.0f} req/s"

        mem = self.results["memory"]
        jsonls = [await broker.jsonl_client() for _ in range(c.clients)]
        await asyncio.gather(*(j.initialize() for j in jsonls))
        mem["sessions16_jsonl_open_mb"] = broker.rss_mb()
        sessions = [await SessionClient.open(broker.endpoint) for _ in range(c.clients)]
        try:
            await asyncio.gather(*(s.initialize() for s in sessions))
            mem["sessions16_open_mb"] = broker.rss_mb()
            out = await self.compare("concurrent", {
                "direct": (f"{c.clients} clients x {c.per_client} requests direct (one shared pipe)",
                           lambda: workloads.concurrent([direct] * c.clients, c.per_client)),
                "session": (f"{c.clients} Sessions x {c.per_client} requests",
                            lambda: workloads.concurrent(sessions, c.per_client)),
                "jsonl": (f"{c.clients} JSONL Sessions x {c.per_client} requests",
                          lambda: workloads.concurrent(jsonls, c.per_client))}, show)
            mem["sessions16_mb"] = broker.rss_mb()
            for s in sessions:  # what the 16 JSONL Sessions alone hold, the gRPC ones gone
                await s.close()
            sessions = []
            mem["sessions16_jsonl_mb"] = broker.rss_mb()
        finally:
            for s in sessions:
                await s.close()
            for j in jsonls:
                await j.close()
        return out


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several repetitions: the median of every number, latency percentiles
    over the pooled samples, the first error if any repetition failed."""
    for result in results:
        if "error" in result:
            return result
    if len(results) == 1:
        return results[0]
    out: dict[str, Any] = {"repetitions": len(results)}
    for key, value in results[0].items():
        values = [r[key] for r in results]
        if isinstance(value, bool) or not isinstance(value, int | float):
            out[key] = value if all(v == value for v in values) else values
        else:
            out[key] = statistics.median(values)
            out[f"{key}_reps"] = values if key in ("p50_us", "notes_per_s", "rps") else None
    if "samples_us" in out:
        pooled = [x for r in results for x in r["samples_us"]]
        out["samples_us"] = pooled
        out.update(workloads.percentiles_us([int(x * 1e3) for x in pooled]))
    return {k: v for k, v in out.items() if v is not None}
