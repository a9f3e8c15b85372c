"""Traffic workloads, each run the same way against the direct pipe and through the broker:
unary round-trip latency, notification throughput (one client; four clients), and many
concurrent clients. Each takes already-initialized clients and returns a dict of figures."""
from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import Any

from bench.clients import RpcError

UNARY_METHOD = "account/read"  # trivial in the fake; the method of DESIGN.md's reference figures
OVERLOADED = -32001  # codex's (and the Node broker's "busy") overload error


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    q = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return {"p50_us": q[49] / 1e3, "p90_us": q[89] / 1e3, "p99_us": q[98] / 1e3,
            "mean_us": statistics.fmean(samples_ns) / 1e3}


async def unary(client: Any, requests: int, warmup: int) -> dict[str, Any]:
    """``requests`` sequential round trips after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        await client.request(UNARY_METHOD, {})
    lat = []
    t0 = time.perf_counter_ns()
    for _ in range(requests):
        s = time.perf_counter_ns()
        await client.request(UNARY_METHOD, {})
        lat.append(time.perf_counter_ns() - s)
    wall = (time.perf_counter_ns() - t0) / 1e9
    return {"method": UNARY_METHOD, "requests": requests, **percentiles_us(lat), "rps": requests / wall,
            "samples_us": [round(x / 1e3, 1) for x in lat]}


async def start_thread(client: Any) -> str:
    return (await client.request("thread/start", {"cwd": "/tmp"}))["thread"]["id"]


def turn_input(deltas: int, seconds: float = 0) -> list[dict[str, str]]:
    return [{"type": "text", "text": f"deltas={deltas} seconds={seconds:g}"}]


async def stream(receivers: list[tuple[Any, str]], starters: list[tuple[Any, str]], deltas: int
                 ) -> dict[str, Any]:
    """Starts one turn of ``deltas`` deltas per starter (client, thread) at once, and waits until
    every receiver (client, thread) has seen its thread's turn/completed. Counts every
    notification of those threads each receiver gets; the clock runs from the first turn/start
    sent to the last turn/completed received."""
    loop = asyncio.get_running_loop()
    counts: Counter[tuple[int, str]] = Counter()
    done: dict[tuple[int, str], asyncio.Future[None]] = {}
    threads_of: dict[int, tuple[Any, set[str]]] = {}
    for client, thread in receivers:
        done[(id(client), thread)] = loop.create_future()
        threads_of.setdefault(id(client), (client, set()))[1].add(thread)

    def handler_for(key: int, threads: set[str]) -> Any:
        def on_note(method: str, params: dict[str, Any]) -> None:
            thread = params.get("threadId")
            if thread not in threads:
                return
            counts[(key, thread)] += 1
            if method == "turn/completed":
                future = done[(key, thread)]
                if not future.done():
                    future.set_result(None)
        return on_note

    for key, (client, threads) in threads_of.items():
        client.set_notification_handler(handler_for(key, threads))
    frames = {key: getattr(client, "frames", 0) for key, (client, _) in threads_of.items()}
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client.request("turn/start", {"threadId": thread, "input": turn_input(deltas)})
                               for client, thread in starters))
        await asyncio.gather(*done.values())
    finally:
        for client, _ in threads_of.values():
            client.set_notification_handler(None)
    seconds = time.perf_counter() - t0
    notes = sum(counts.values())
    frames_seen = sum(getattr(client, "frames", 0) - frames[key] for key, (client, _) in threads_of.items())
    out = {"clients": len(threads_of), "turns": len(starters), "deltas_per_turn": deltas,
           "notifications": notes, "seconds": seconds, "notes_per_s": notes / seconds,
           "min_per_receiver": min(counts[k] for k in done), "expected_per_receiver": deltas + 4}
    if frames_seen:  # Sessions: how well the broker batched (ServerFrames carry many messages)
        out["messages_per_frame"] = notes / frames_seen
    return out


async def concurrent(clients: list[Any], per_client: int) -> dict[str, Any]:
    """Every client sends ``per_client`` sequential requests, all clients at once."""
    go, errors, ok_per_client, lat = asyncio.Event(), Counter[Any](), [], []

    async def worker(client: Any) -> None:
        ok = 0
        await go.wait()
        for _ in range(per_client):
            s = time.perf_counter_ns()
            try:
                await client.request(UNARY_METHOD, {})
                lat.append(time.perf_counter_ns() - s)
                ok += 1
            except RpcError as exc:
                errors[exc.code] += 1
        ok_per_client.append(ok)

    tasks = [asyncio.create_task(worker(c)) for c in clients]
    await asyncio.sleep(0.05)  # every worker parked on the event
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    served = sum(ok_per_client)
    refused = errors.pop(OVERLOADED, 0)
    return {"clients": len(clients), "per_client": per_client, "attempted": len(clients) * per_client,
            "served": served, "refused": refused, "other_errors": {str(k): v for k, v in errors.items()},
            "wall_s": wall, "rps": served / wall, "min_served_per_client": min(ok_per_client),
            **{k: v for k, v in percentiles_us(lat).items() if k != "mean_us"}}
