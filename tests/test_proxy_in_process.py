"""The broker as a library: ``Broker(config).run()`` in the caller's own event loop prepares
its files and spawns its app-server itself (``serve`` does both before loading grpc and hands
them over), serves, and on a drain stops the app-server and removes everything it made."""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil

import grpc
import psutil
from conftest import fake_command, new_marker, processes_with, short_dir
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.broker import Broker
from proxy.config import ServeConfig


def test_broker_run_in_process_spawns_serves_and_cleans_up():
    base = short_dir()
    marker = new_marker()
    sock = os.path.join(base, "d", "s.sock")
    config = ServeConfig(endpoint=f"unix:{sock}", app_server=shlex.split(fake_command(marker=marker)), cwd=base)

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        class OnReady(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("ready "):
                    loop.call_soon_threadsafe(ready.set)

        handler = OnReady()
        logger = logging.getLogger("codex_broker.proxy")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            broker = Broker(config)
            running = asyncio.create_task(broker.run())
            await asyncio.wait([running, asyncio.ensure_future(ready.wait())], timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            assert ready.is_set(), running.result() if running.done() else "not ready in 30 s"
        except BaseException:
            broker.stop(1)
            await asyncio.wait([running], timeout=30)
            raise
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            async for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            watch.cancel()
        assert broker.app is not None and broker.app.pid is not None
        app_pid = broker.app.pid
        assert psutil.Process(app_pid).is_running()
        broker.drain(0, reason="test")
        return await asyncio.wait_for(running, 30), app_pid

    try:
        code, app_pid = asyncio.run(main())
        assert code == 0
        assert not psutil.pid_exists(app_pid)  # stopped and reaped
        assert not os.path.exists(os.path.dirname(sock))
        assert not processes_with(marker)
    finally:
        shutil.rmtree(base, ignore_errors=True)
