"""The broker as a library: ``Broker(config).run()`` in the caller's own event loop prepares
its files and spawns its app-server itself (``serve`` does both before loading grpc and hands
them over), sets ``Broker.ready`` once it listens and says SERVING, and on a drain stops the
app-server and removes everything it made. It leaves the embedding process as it found it (no
signal handlers, not a child subreaper), and a background task that fails stops it."""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import fake_command, new_marker, processes_with, short_dir

from proxy import child
from proxy.broker import Broker
from proxy.config import ServeConfig

SERVING = health_pb2.HealthCheckResponse.SERVING


def run_embedded(then: Callable[[Broker, str], Awaitable[Any]]) -> tuple[int, int, str, Any]:
    """Runs a broker in this process until ready, then ``then(broker, sock)``, then waits for
    ``run()`` to return: (exit code, app-server pid, socket path, what ``then`` returned)."""
    base = short_dir()
    marker = new_marker()
    sock = os.path.join(base, "d", "s.sock")
    config = ServeConfig(endpoint=f"unix:{sock}", app_server=shlex.split(fake_command(marker=marker)), cwd=base)

    async def main() -> tuple[int, int, Any]:
        broker = Broker(config)
        running = asyncio.create_task(broker.run())
        try:
            await asyncio.wait([running, asyncio.ensure_future(broker.ready.wait())], timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            assert broker.ready.is_set(), running.result() if running.done() else "not ready in 30 s"
            assert broker.app is not None and broker.app.pid is not None
            app_pid = broker.app.pid
            outcome = await then(broker, sock)
            return await asyncio.wait_for(running, 30), app_pid, outcome
        except BaseException:
            broker.stop(1)
            await asyncio.wait([running], timeout=30)
            raise

    try:
        code, app_pid, outcome = asyncio.run(main())
        assert not processes_with(marker)
        return code, app_pid, sock, outcome
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def serving(sock: str) -> bool:
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        async for reply in watch:
            if reply.status == SERVING:
                watch.cancel()
                return True
    return False


def test_broker_run_in_process_spawns_serves_and_cleans_up():
    async def drain(broker: Broker, sock: str) -> None:
        assert await serving(sock)
        assert broker.app is not None and psutil.Process(broker.app.pid).is_running()
        broker.drain(0, reason="test")

    code, app_pid, sock, _ = run_embedded(drain)
    assert code == 0
    assert not psutil.pid_exists(app_pid)  # stopped and reaped
    assert not os.path.exists(os.path.dirname(sock))
    assert not child.is_subreaper()  # only `serve` becomes one


def test_an_embedded_broker_removes_its_signal_handlers_when_it_returns():
    """What the embedding process had (asyncio.run's own SIGINT handler included) is back."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)

    async def main() -> tuple[dict[int, Any], dict[int, Any]]:
        before = {sig: signal.getsignal(sig) for sig in signals}
        base = short_dir()
        try:
            sock = os.path.join(base, "d", "s.sock")
            config = ServeConfig(endpoint=f"unix:{sock}",
                                 app_server=shlex.split(fake_command(marker=new_marker())), cwd=base)
            broker = Broker(config)
            running = asyncio.create_task(broker.run())
            await asyncio.wait_for(broker.ready.wait(), 30)
            broker.drain(0, reason="test")
            assert await asyncio.wait_for(running, 30) == 0
            return before, {sig: signal.getsignal(sig) for sig in signals}  # still inside the loop
        finally:
            shutil.rmtree(base, ignore_errors=True)

    before, after = asyncio.run(main())
    assert after == before


def test_a_failing_background_task_stops_the_broker_with_exit_1():
    async def break_health(broker: Broker, sock: str) -> None:
        assert await serving(sock)

        def boom() -> bool:
            raise RuntimeError("health loop bug")

        broker.health.proof_is_stale = boom  # type: ignore[method-assign]

    code, app_pid, sock, _ = run_embedded(break_health)
    assert code == 1
    assert not psutil.pid_exists(app_pid)
    assert not os.path.exists(os.path.dirname(sock))
