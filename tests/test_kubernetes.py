"""deploy/kubernetes/codex-broker.yaml, checked against a real broker: the manifest's own serve
arguments start it, a stand-in kubelet runs the manifest's own probes (service names,
timeoutSeconds, periodSeconds, failureThreshold; periods scaled down for CI) over real gRPC
against the health endpoint, and the preStop command drains it. The pod is ready only once the
broker is SERVING; while it drains it is not ready and its liveness stays SERVING; a wedged
app-server (SIGSTOP) fails liveness. The grace period covers the drain deadline and the stop.
Its schema is validated by kubernetes-validate (offline schemas), here and in CI."""
from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import SessionClient, aio_channel, run

from protos import broker_pb2
from proxy import contract
from proxy.contract import add_serve_arguments

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "codex-broker.yaml"
PERIOD_SCALE = 0.1  # a probe period of 10 s runs every 1 s here
APP_SERVER_STOP = 4.0  # the app-server's polite wait plus its SIGTERM wait, at most (broker._stop_children)
FAST_PROBES = ("--probe-interval", "0.2", "--probe-timeout", "1", "--exit-when-wedged", "0")


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def container() -> dict[str, Any]:
    containers = manifest()["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def serve_args() -> list[str]:
    c = container()
    assert c["command"] == ["codex-broker", "serve"]
    return list(c["args"])


def parsed_serve_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(serve_args())


@dataclass
class Probe:
    """One of the manifest's gRPC probes, played as kubelet plays it."""

    name: str
    service: str
    port: int
    period: float
    timeout: float
    failure_threshold: int
    success_threshold: int

    @classmethod
    def from_manifest(cls, name: str) -> Probe:
        spec = container()[name]
        return cls(name=name, service=spec["grpc"].get("service", ""), port=spec["grpc"]["port"],
                   period=spec.get("periodSeconds", 10) * PERIOD_SCALE, timeout=spec.get("timeoutSeconds", 1),
                   failure_threshold=spec.get("failureThreshold", 3),
                   success_threshold=spec.get("successThreshold", 1))

    async def once(self, target: str) -> bool:
        """One probe: SERVING within timeoutSeconds is a success; anything else is a failure."""
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.service), timeout=self.timeout)
            except grpc.aio.AioRpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


class Kubelet:
    """Runs startup, then readiness and liveness, every period, and keeps kubelet's verdicts:
    ready, and how many times liveness would have restarted the container."""

    def __init__(self, target: str):
        self.target = target
        self.startup = Probe.from_manifest("startupProbe")
        self.readiness = Probe.from_manifest("readinessProbe")
        self.liveness = Probe.from_manifest("livenessProbe")
        self.started = asyncio.Event()
        self.startup_failures = 0
        self.ready = False
        self.restarts = 0
        self.live_checks: list[bool] = []
        self.changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Kubelet:
        self._tasks.append(asyncio.create_task(self._run()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while not await self.startup.once(self.target):
            self.startup_failures += 1
            assert self.startup_failures < self.startup.failure_threshold, "startup probe failed: restart"
            await asyncio.sleep(self.startup.period)
        self.started.set()
        self._tasks += [asyncio.create_task(self._readiness()), asyncio.create_task(self._liveness())]

    async def _readiness(self) -> None:
        failures = successes = 0
        while True:
            if await self.readiness.once(self.target):
                failures, successes = 0, successes + 1
                if successes >= self.readiness.success_threshold:
                    self._set(ready=True)
            else:
                failures, successes = failures + 1, 0
                if failures >= self.readiness.failure_threshold:
                    self._set(ready=False)
            await asyncio.sleep(self.readiness.period)

    async def _liveness(self) -> None:
        failures = 0
        while True:
            ok = await self.liveness.once(self.target)
            self.live_checks.append(ok)
            failures = 0 if ok else failures + 1
            if failures >= self.liveness.failure_threshold:
                self.restarts += 1
                failures = 0
            self.changed.set()
            await asyncio.sleep(self.liveness.period)

    def _set(self, *, ready: bool) -> None:
        self.ready = ready
        self.changed.set()

    async def until(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"kubelet never saw: {what}"
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pod_flags(port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The manifest's serve arguments for a test broker: its own endpoint and app-server come
    from the harness, the health endpoint keeps the manifest's address on ``port``, the
    downward API's pod UID is a fresh uuid."""
    flags: list[str] = []
    pod_uid = str(uuid.uuid4())
    for arg in serve_args():
        if arg.startswith(("--endpoint=", "--app-server=")):
            continue
        if arg.startswith("--health-endpoint="):
            arg = re.sub(r":\d+$", f":{port}", arg)
        flags.append(arg.replace("$(POD_UID)", pod_uid))
    return [*flags, *extra]


def test_the_manifest_passes_kubernetes_validate_strict():
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(MANIFEST)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_grace_period_covers_the_drain_deadline_and_the_stop():
    args = parsed_serve_args()
    stop = (contract.INTERRUPT_GRACE + contract.FORCE_GRACE + contract.SESSION_FLUSH
            + APP_SERVER_STOP + contract.STOP_GRACE)
    grace = manifest()["spec"]["terminationGracePeriodSeconds"]
    assert grace >= args.drain_deadline + stop, (grace, args.drain_deadline, stop)


def test_the_manifest_serves_health_on_every_address_with_the_idle_timeout_off_and_the_pod_uid():
    args = parsed_serve_args()
    assert args.health_endpoint.startswith("tcp:0.0.0.0:")
    assert args.idle_timeout == 0
    assert args.instance_id == "$(POD_UID)"
    env = {e["name"]: e for e in container()["env"]}
    assert env["POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    port = int(args.health_endpoint.rsplit(":", 1)[1])
    services = {name: Probe.from_manifest(name) for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p.port for p in services.values()} == {port}
    assert services["readinessProbe"].service == ""
    assert services["livenessProbe"].service == "codexbroker.v1.Liveness"
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:3] == ["codex-broker", "drain", "--wait"]
    assert pre_stop[pre_stop.index("--endpoint") + 1] == args.endpoint


def test_kubelet_sees_ready_after_serving_not_ready_while_draining_and_live_until_exit(broker):
    port = free_port()
    b = broker(*pod_flags(port), env={"FAKE_STARTUP_SECONDS": "2"}, ready=False)

    async def main() -> None:
        async with Kubelet(f"127.0.0.1:{port}") as kubelet:  # from the start: the broker is still starting
            await kubelet.until("ready", lambda: kubelet.ready)
            assert kubelet.startup_failures > 0, "the startup probe never saw the broker starting"
            assert b.status().state == broker_pb2.BROKER_STATE_SERVING
            async with aio_channel(b) as channel, SessionClient(channel) as s:
                thread = await s.start_thread()
                turn = await s.start_turn(thread, "deltas=20 seconds=6")
                await s.until(lambda m: m.get("method") == "turn/started")
                pre_stop = [*container()["lifecycle"]["preStop"]["exec"]["command"]]
                pre_stop[pre_stop.index("--endpoint") + 1] = b.endpoint
                drain = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "lifecycle.cli", *pre_stop[1:], cwd=ROOT,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                await kubelet.until("not ready while draining", lambda: not kubelet.ready)
                checks = len(kubelet.live_checks)
                await kubelet.until("two liveness checks while draining",
                                    lambda: len(kubelet.live_checks) >= checks + 2)
                assert all(kubelet.live_checks[checks:]), kubelet.live_checks
                assert kubelet.restarts == 0
                assert b.status().state == broker_pb2.BROKER_STATE_DRAINING
                completed = await s.turn_completed(thread, turn)
                assert completed["params"]["turn"]["status"] == "completed"
                out, _ = await asyncio.wait_for(drain.communicate(), 60)
                assert drain.returncode == 0, out.decode(errors="replace")
                assert b"exited" in out
            assert kubelet.restarts == 0

    run(main())
    assert b.wait_exit(30) == 0


def test_kubelet_liveness_fails_once_the_app_server_is_wedged(broker):
    port = free_port()
    b = broker(*pod_flags(port, FAST_PROBES))
    app = b.app_server

    async def main() -> None:
        async with Kubelet(f"127.0.0.1:{port}") as kubelet:
            await kubelet.until("ready", lambda: kubelet.ready)
            await kubelet.until("a liveness check", lambda: bool(kubelet.live_checks))
            assert kubelet.restarts == 0
            app.send_signal(signal.SIGSTOP)
            try:
                await kubelet.until("a liveness restart", lambda: kubelet.restarts > 0, timeout=60)
                assert not kubelet.ready
            finally:
                app.send_signal(signal.SIGCONT)

    run(main())


