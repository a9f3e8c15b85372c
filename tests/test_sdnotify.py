"""systemd's notify protocol against a real datagram socket (a path, and an abstract name): READY=1
once SERVING, STATUS= with Sessions and turns, STOPPING=1 when a drain starts, WATCHDOG=1 while
the app-server answers (draining too) and never while it is wedged; the app-server's environment
has none of systemd's notify variables."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import NOT_SERVING, SERVING, SessionClient, aio_channel, next_status, run, short_dir

from protos import broker_pb2, broker_pb2_grpc
from proxy.sdnotify import child_environment, socket_address, watchdog_interval

WATCHDOG_USEC = 400_000  # a ping every 0.2 s


class NotifySocket:
    """The test's end of $NOTIFY_SOCKET: an AF_UNIX SOCK_DGRAM socket; each datagram is read as
    the set of its lines."""

    def __init__(self, name: str, address: str | bytes):
        self.name = name  # what NOTIFY_SOCKET says
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.seen: list[set[str]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name, "WATCHDOG_USEC": str(WATCHDOG_USEC), **extra}

    def receive(self, timeout: float) -> set[str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        message = set(data.decode().split("\n"))
        self.seen.append(message)
        return message

    def until(self, predicate: Callable[[set[str]], bool], what: str, timeout: float = 30.0) -> set[str]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and predicate(message):
                return message
        raise AssertionError(f"no {what} within {timeout:g} s; received {self.seen}")

    def drain_queue(self) -> None:
        """Reads what is already queued (sent before now), without waiting."""
        while self.receive(0.001) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket() -> Iterator[NotifySocket]:
    directory = short_dir()
    path = os.path.join(directory, "notify")
    ns = NotifySocket(path, path)
    yield ns
    ns.close()
    os.unlink(path)
    os.rmdir(directory)


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"codex-broker-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket(f"@{name}", b"\0" + name.encode())
    yield ns
    ns.close()


def is_watchdog(message: set[str]) -> bool:
    return "WATCHDOG=1" in message


def status_of(message: set[str]) -> str:
    return next((line.removeprefix("STATUS=") for line in message if line.startswith("STATUS=")), "")


def test_notify_socket_addresses_watchdog_rules_and_the_childs_environment():
    assert socket_address("/run/user/1000/systemd/notify") == "/run/user/1000/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify/123") == b"\0/org/freedesktop/systemd1/notify/123"
    assert socket_address("relative") is None
    assert socket_address("") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, 42) is None  # meant for another
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({}, 42) is None
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "HOME": "/h"}
    assert child_environment(env) == {"HOME": "/h"}


def test_ready_status_stopping_and_watchdog_during_a_drain_over_a_path_socket(broker, path_socket):
    ns = path_socket
    b = broker(env=ns.env(WATCHDOG_PID="", CXB_KEPT="yes"))  # an empty WATCHDOG_PID names no other process
    first = ns.until(lambda m: True, "first message")
    assert "READY=1" in first, f"READY=1 must come first: {first}"
    assert f"MAINPID={b.pid}" in first
    assert b.health() == SERVING
    ns.until(is_watchdog, "WATCHDOG=1 while serving")
    environ = b.app_server.environ()
    assert environ.get("CXB_KEPT") == "yes"
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(environ), environ

    async def main() -> None:
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            await s.initialize()
            thread = await s.start_thread()
            turn = await s.start_turn(thread, "deltas=40 seconds=6")
            await asyncio.to_thread(ns.until, lambda m: "1 sessions, 1 turns" in status_of(m), "STATUS with the turn")
            reply = await broker_pb2_grpc.BrokerStub(channel).Drain(
                broker_pb2.DrainRequest(deadline_seconds=60, reason="test"), timeout=30)
            assert reply.state == broker_pb2.BROKER_STATE_DRAINING
            stopping = await asyncio.to_thread(ns.until, lambda m: "STOPPING=1" in m, "STOPPING=1")
            assert status_of(stopping).startswith("draining")
            for _ in range(2):  # the watchdog goes on while the turn finishes
                await asyncio.to_thread(ns.until, is_watchdog, "WATCHDOG=1 while draining")
            completed = await s.turn_completed(thread, turn)
            assert completed["params"]["turn"]["status"] == "completed"

    run(main())
    assert b.wait_exit() == 0


def test_ready_over_an_abstract_socket(broker, abstract_socket):
    b = broker(env=abstract_socket.env())
    assert "READY=1" in abstract_socket.until(lambda m: True, "first message")
    abstract_socket.until(is_watchdog, "WATCHDOG=1")
    b.drain(5)
    abstract_socket.until(lambda m: "STOPPING=1" in m, "STOPPING=1")
    assert b.wait_exit() == 0


def test_no_watchdog_ping_while_the_app_server_is_wedged(broker, path_socket):
    ns = path_socket
    b = broker("--probe-interval", "0.2", "--probe-timeout", "0.5", "--exit-when-wedged", "0", env=ns.env())
    ns.until(is_watchdog, "WATCHDOG=1 while serving")

    async def main() -> None:
        async with aio_channel(b) as channel, SessionClient(channel) as s:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            await next_status(watch, SERVING, 10)
            await s.send({"id": "hang", "method": "fake/hang", "params": {}})
            await next_status(watch, NOT_SERVING, 30)
            watch.cancel()
            # Wedged from here for good: anything decided before NOT_SERVING is already queued.
            ns.drain_queue()
            late = await asyncio.to_thread(collect, ns, 2.0)
            assert not [m for m in late if is_watchdog(m)], late

    run(main())
    assert b.alive()  # --exit-when-wedged 0: only the watchdog would end it


def collect(ns: NotifySocket, seconds: float) -> list[set[str]]:
    deadline = time.monotonic() + seconds
    messages = []
    while (remaining := deadline - time.monotonic()) > 0:
        message = ns.receive(remaining)
        if message is not None:
            messages.append(message)
    return messages
