"""Health from a real round trip: grpc.health.v1 answers SERVING only while the app-server is
alive, initialized, the broker accepts work, and the app-server has answered recently.

When nothing has answered within the probe interval, a cheap read-only probe request goes to
the app-server (one outstanding at a time). The app-server is wedged when a request has waited
longer than the hang threshold and nothing at all has answered for that long: a slow request
next to a responsive server is not a hang. A Check arriving when the last proof is stale joins
the probe and waits for it briefly, so one Check is a real client -> proxy -> app-server ->
proxy -> client round trip; it never blocks past 0.5 s or its own deadline.

Probing goes on while the broker drains (a wedge then must end the drain: ``on_wedged`` is
called on every tick the app-server counts as wedged); it stops only when the broker stops.

Readiness is not liveness. Health "" and ``codexbroker.v1.AppServer`` are readiness: NOT_SERVING
as soon as a drain starts. ``codexbroker.v1.Liveness`` is NOT_SERVING only while the app-server
is wedged or gone (or the broker stops): a liveness probe on it never restarts a draining broker
and kills its turns, and always restarts a wedged one.

The health endpoint (``--health-endpoint``) and the token-guarded TCP endpoint describe Health
by reflection to anyone: ``health_reflection`` answers from a descriptor pool that holds only
grpc/health/v1/health.proto, so no other service, symbol or file can be found through it."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import _async as reflection_aio

from proxy.hub import PROBE, AppServerGone, Hub, Pending

log = logging.getLogger("codex_broker.proxy")

READINESS = ("", "codexbroker.v1.AppServer")
LIVENESS = "codexbroker.v1.Liveness"
SERVICES = (*READINESS, LIVENESS)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
CHECK_WAIT = 0.5  # longest a Check waits for its probe
TICK = 0.2


class HealthMonitor:
    def __init__(self, hub: Hub, *, interval: float, hang_after: float, method: str,
                 accepting: Callable[[], bool], app_alive: Callable[[], bool],
                 on_wedged: Callable[[], None] = lambda: None):
        self.hub = hub
        self.interval = interval
        self.hang_after = hang_after
        self.method = method
        self._accepting = accepting
        self._app_alive = app_alive
        self._on_wedged = on_wedged
        self._probe: asyncio.Future[None] | None = None
        self._published: bool | None = None
        self._published_alive: bool | None = None
        self.last_probe_at = 0.0  # unix time
        self.last_probe_latency = 0.0  # seconds
        self.servicer = BrokerHealthServicer(self)
        hub.on_probe_response = self._probe_answered

    # -- the verdict ---------------------------------------------------------------------
    def wedged(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        oldest = self.hub.oldest_pending()
        return (oldest is not None and now - oldest > self.hang_after
                and now - self.hub.last_response > self.hang_after)

    def wedged_for(self, now: float | None = None) -> float:
        """How long the app-server has been wedged without a break (0 when it is not): since
        the later of its oldest unanswered request and its last answer of any kind, plus the
        hang threshold. Any answer moves the last answer, so it starts again from 0."""
        now = time.monotonic() if now is None else now
        oldest = self.hub.oldest_pending()
        if oldest is None or not self.wedged(now):
            return 0.0
        return now - (max(oldest, self.hub.last_response) + self.hang_after)

    def alive(self) -> bool:
        """Liveness: the app-server runs, was initialized, is not gone and not wedged (whether
        or not the broker accepts work)."""
        return (self._app_alive() and self.hub.init_result is not None and self.hub.gone is None
                and not self.wedged())

    def serving(self) -> bool:
        """Readiness: alive, and the broker accepts work (not draining or stopping)."""
        return self._accepting() and self.alive()

    def proof_is_stale(self) -> bool:
        return time.monotonic() - self.hub.last_response >= self.interval

    # -- probing -------------------------------------------------------------------------
    def probe(self) -> asyncio.Future[None]:
        """The outstanding probe, started if there is none."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_future()
            try:
                self.hub.request(PROBE, self.method, {})
            except AppServerGone:
                self._probe.set_result(None)
        return self._probe

    def _probe_answered(self, pending: Pending) -> None:
        self.last_probe_latency = time.monotonic() - pending.sent_at
        self.last_probe_at = time.time()
        if self._probe is not None and not self._probe.done():
            self._probe.set_result(None)

    async def publish(self) -> bool:
        """Tells watchers the current verdicts (readiness, liveness) if they changed; returns
        readiness."""
        serving, alive = self.serving(), self.alive()
        if serving != self._published:
            if self._published is not None or serving:
                log.info("health %s", "SERVING" if serving else "NOT_SERVING" + self._why_not())
            self._published = serving
            for service in READINESS:
                await self.servicer.set(service, SERVING if serving else NOT_SERVING)
        if alive != self._published_alive:
            if self._published_alive is not None or alive:
                log.info("liveness %s", "SERVING" if alive else "NOT_SERVING" + self._why_not())
            self._published_alive = alive
            await self.servicer.set(LIVENESS, SERVING if alive else NOT_SERVING)
        return serving

    def _why_not(self) -> str:
        if self.hub.gone is not None or not self._app_alive():
            return " (app-server gone)"
        if self.wedged():
            oldest = self.hub.oldest_pending() or time.monotonic()
            return f" (app-server has not answered for {time.monotonic() - oldest:.1f} s)"
        if not self._accepting():
            return " (draining)"
        return ""

    async def run(self) -> None:
        """Probes when the last proof is stale (serving or draining) and publishes changes,
        until cancelled."""
        while True:
            if self.proof_is_stale() and self.hub.gone is None and not self.hub.stopping:
                self.probe()
            if self.wedged():
                self._on_wedged()
            await self.publish()
            await asyncio.sleep(TICK)

    async def check(self, deadline_remaining: float | None, service: str = "") -> bool:
        """The verdict for ``service`` (liveness for LIVENESS, else readiness), after a probe
        when the last proof is stale."""
        if self.proof_is_stale() and self.hub.gone is None:
            budget = CHECK_WAIT if deadline_remaining is None else min(CHECK_WAIT, deadline_remaining - 0.05)
            if budget > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(self.probe()), budget)
                except TimeoutError:
                    pass
        serving = await self.publish()
        return bool(self._published_alive) if service == LIVENESS else serving


class BrokerHealthServicer(HealthServicer):
    """grpcio-health-checking's servicer, starting NOT_SERVING, whose Check is a round trip."""

    def __init__(self, monitor: HealthMonitor):
        super().__init__()
        self._monitor = monitor
        for service in SERVICES:
            self._server_status[service] = NOT_SERVING

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        """The library's Watch, except that the stream ends (OK) once it has told a stopping
        broker's final NOT_SERVING: the broker then stops gRPC with a grace, so the replies
        of calls still in flight go out instead of every RPC being cancelled. Nor does it hold
        the status lock while it writes to a client."""
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        last = None
        try:
            while True:
                async with condition:
                    status = self._server_status.get(service, SERVICE_UNKNOWN)
                    while status == last and not self._told_final(status):
                        await condition.wait()
                        status = self._server_status.get(service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._told_final(last):
                    return
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]

    def _told_final(self, status: object) -> bool:
        return self._gracefully_shutting_down and status != SERVING

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good, and every Watch told so (those on unknown services too)."""
        await super().enter_graceful_shutdown()
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        serving = await self._monitor.check(context.time_remaining(), request.service)
        return health_pb2.HealthCheckResponse(status=SERVING if serving else NOT_SERVING)


def health_reflection() -> reflection_aio.ReflectionServicer:
    """A reflection servicer that lists grpc.health.v1.Health only and describes nothing else:
    its descriptor pool holds health.proto alone (health.proto imports nothing)."""
    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(proto)
    pool.Add(proto)
    return reflection_aio.ReflectionServicer([HEALTH_SERVICE], pool=pool)
