"""The broker process: start the app-server, listen, serve, drain, stop.

Start returns when ready: the app-server is spawned and initialized before the socket exists,
so a client that can connect finds a broker that can serve; ``Broker.ready`` is set once it
listens and says SERVING. Stopping is one sequence whatever asked for it (drain completed,
deadline, idle, signal, app-server death or wedge, a background task's crash), run in a
``finally``: end Sessions cleanly, stop the app-server's whole process group with escalation
(and, in a subreaper, every descendant left), end every health Watch with a final NOT_SERVING,
stop gRPC with a short grace (replies in flight go out, new RPCs are refused), remove the
socket, pid file and directory, remove the signal handlers.

The lifetime is supervised: a background task (health, app-server watcher, drain, idle, age,
wedge) that raises stops the broker with exit 1, so a broker never keeps publishing its last
SERVING.

The broker polices itself, however it was started, so a client that only checks that the socket
accepts is never handed a broken broker. Aged (older than ``max_age_seconds``, 0 = never): it
drains itself, reason "max age", and exits 0 once its turns are done. Wedged (the health rule's
hang, without a break, for ``exit_when_wedged`` seconds, 0 = never): the sockets' paths are
removed at once, pending work fails with the reason, the app-server's group is killed, exit 1.
Wedged at all while draining: the same stop, at once (nothing will finish the turns).
Signals: SIGTERM and SIGINT drain; repeated SIGTERMs and JSONL ``broker/shutdown`` requests are
one drain request (clients ending together never kill a third one's turns); only a second SIGINT
(a person at a terminal) stops at once.

With ``--jsonl-endpoint`` the broker also serves Sessions as JSON lines (proxy/jsonl.py); that
listener is closed and its path removed as soon as any drain starts (whatever its reason), while
gRPC and health stay up until the broker stops, so ops tools still see DRAINING.

With ``--health-endpoint`` a second gRPC server serves the same health servicer (readiness and
``codexbroker.v1.Liveness``) and reflection of Health only, without the token, on any address;
it starts after the broker's own endpoint and stops with it (its unix socket, if any, removed).

Under systemd (Type=notify, $NOTIFY_SOCKET; see proxy/sdnotify.py) the broker says READY=1 once
SERVING, STATUS= with its Sessions and turns as they change, STOPPING=1 when a drain (or the stop)
starts, and WATCHDOG=1 every half WATCHDOG_USEC while the app-server is neither wedged nor gone,
draining included: WatchdogSec restarts a wedged broker, never a draining one."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from protos import broker_pb2, broker_pb2_grpc
from proxy import __version__, jsonrpc, scheduling
from proxy import child as child_process
from proxy.appserver import AppServerProcess
from proxy.config import BrokerFiles, ConfigError, ServeConfig, StartError, parse_tcp_endpoint
from proxy.contract import FORCE_GRACE, INTERRUPT_GRACE, SESSION_FLUSH, STOP_GRACE
from proxy.health import HealthMonitor, health_reflection
from proxy.hub import CALL, AppServerGone, Hub
from proxy.reaper import Reaper
from proxy.sdnotify import Notifier, status_text
from proxy.service import AppServerService, BrokerService, add_app_server_service, status_message
from proxy.session import Ending

if TYPE_CHECKING:  # loaded where they are used, only when the flags ask for them
    from proxy.jsonl import JsonlServer
    from proxy.metrics import BrokerMetrics, MetricsServer

log = logging.getLogger("codex_broker.proxy")

MAX_DRAIN_DEADLINE = 86400.0  # a longer (or infinite) drain deadline is cut to this (one day)
AGE_TICK = 30.0  # the max age is checked at least this often (the clocks may disagree)
WEDGE_TICK = 0.5  # how often a wedge's length is checked against --exit-when-wedged
NOTIFY_TICK = 1.0  # under systemd, STATUS= is refreshed (when it changed) this often
S = broker_pb2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def drain_seconds(requested: float | None, default: float) -> float:
    """The drain deadline to apply: unset, NaN or <= 0 is the broker's default (never "now");
    anything longer than MAX_DRAIN_DEADLINE (inf, 1e300) is MAX_DRAIN_DEADLINE."""
    if requested is None or math.isnan(requested) or requested <= 0:
        requested = default
    return min(requested, MAX_DRAIN_DEADLINE)


def _on_sigchld(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` runs in the loop on every SIGCHLD. uvloop keeps SIGCHLD for itself (its own
    subprocesses, which the broker does not use): there a plain handler hands it to the loop."""
    try:
        loop.add_signal_handler(signal.SIGCHLD, callback)
    except RuntimeError:
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: loop.call_soon_threadsafe(callback))


class Broker:
    def __init__(self, config: ServeConfig, *, files: BrokerFiles | None = None,
                 child: subprocess.Popen[bytes] | None = None, early_signals: list[int] | None = None,
                 subreaper: bool = False):
        """``files`` already prepared and ``child`` already spawned let `serve` do both while
        this module was still importing; without them, ``run`` does both. ``early_signals``:
        where `serve` notes SIGTERM/SIGINT until ``run`` installs its own handlers. ``subreaper``:
        only in a process that made itself a child subreaper (`serve`), never in one that
        merely embeds the broker: reap orphans, and stop every descendant at the end."""
        self.config = config
        self.files = files or BrokerFiles(config)
        self._child = child
        self._early_signals = early_signals if early_signals is not None else []
        self.version = __version__
        self.state = S.BROKER_STATE_STARTING
        self.started_at = time.time()
        self._mono0 = time.monotonic()
        self.hub = Hub(send=self._send, stdin_backlog=self._stdin_backlog,
                       session_buffer_bytes=config.session_buffer_bytes, on_change=self._changed)
        self.app: AppServerProcess | None = None
        self.pacer: scheduling.StreamPacer | None = None  # see _start_app_server
        self.app_server_create_time_ms = 0
        self.health = HealthMonitor(self.hub, interval=config.probe_interval, hang_after=config.probe_timeout,
                                    method=config.probe_method, accepting=lambda: self.accepting,
                                    app_alive=lambda: self.app is not None and self.app.alive,
                                    on_wedged=self._app_server_wedged)
        self.reaper = Reaper(keep=self._own_children) if subreaper else None
        self.metrics: BrokerMetrics | None = None  # with --metrics-endpoint (prometheus-client loads only then)
        self.metrics_server: MetricsServer | None = None
        if config.metrics_endpoint is not None:
            self._count_metrics()
        self.ready = asyncio.Event()  # set once listening and SERVING
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None  # with --health-endpoint
        self.jsonl: JsonlServer | None = None  # the JSONL front end, with --jsonl-endpoint
        self.drain_reason = ""
        self._drain_deadline: float | None = None  # monotonic
        self._force = False
        self._change = asyncio.Event()
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._idle_since: float | None = None
        self._signals = 0
        self._sigints = 0
        self._app_wedged = False  # the app-server stopped answering: stop it without the polite waits
        self._starting: asyncio.Task[None] | None = None
        self._drain_asked = ""  # a client asked for a drain before the broker was SERVING
        self.notify = Notifier()  # systemd's notify socket; a no-op without $NOTIFY_SOCKET

    def _count_metrics(self) -> None:
        from proxy.metrics import BrokerMetrics

        metrics = self.metrics = BrokerMetrics(self)
        self.hub.on_turn_end = metrics.turn_seconds.observe
        answered = self.hub.on_probe_response

        def probe_answered(pending: Any) -> None:
            answered(pending)
            metrics.probe_seconds.observe(self.health.last_probe_latency)

        self.hub.on_probe_response = probe_answered

    # -- small facts ---------------------------------------------------------------------
    @property
    def state_name(self) -> str:
        return S.BrokerState.Name(self.state).removeprefix("BROKER_STATE_")

    @property
    def accepting(self) -> bool:
        return self.state == S.BROKER_STATE_SERVING

    @property
    def drain_deadline_unix(self) -> float:
        return self.wall_time(self._drain_deadline) if self._drain_deadline is not None else 0.0

    def wall_time(self, monotonic: float) -> float:
        return self.started_at + (monotonic - self._mono0)

    def status(self) -> broker_pb2.BrokerStatus:
        return status_message(self)

    def _send(self, line: bytes) -> None:
        assert self.app is not None
        self.app.send(line)

    def _stdin_backlog(self) -> int:
        return self.app.write_buffer_size() if self.app else 0

    def _own_children(self) -> set[int]:
        """Children whose exit status is waited for elsewhere (the app-server's Popen)."""
        return {c.pid for c in (self._child, self.app) if c is not None and c.pid is not None}

    def _changed(self) -> None:
        self._change.set()
        if self.hub.sessions or self.hub.in_flight:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = time.monotonic()

    # -- the whole life ------------------------------------------------------------------
    async def run(self) -> int:
        """Serves until stopped; returns the exit code. ConfigError for bad input. The signal
        handlers it installs are removed when it returns, whatever the way."""
        loop = asyncio.get_running_loop()
        signals: list[signal.Signals] = [*STOP_SIGNALS]
        if self.reaper is not None:
            signals.append(signal.SIGCHLD)
        # What was there before comes back afterwards, not the default: `serve` notes a late
        # signal there, so a SIGTERM while the process exits cannot turn exit 0 into a death.
        previous = {sig: signal.getsignal(sig) for sig in signals}
        for sig in STOP_SIGNALS:  # from the start: a signal while starting cleans up too
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.reaper is not None:
            _on_sigchld(loop, self.reaper.reap_orphans)
            self.reaper.reap_orphans()  # those that ended before the handler existed
        try:
            return await self._run()
        finally:
            for sig in signals:
                if not loop.remove_signal_handler(sig):
                    signal.signal(sig, signal.SIG_DFL)  # installed by _on_sigchld, not the loop
                handler = previous[sig]
                if handler is not None:
                    signal.signal(sig, handler)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        if not self.files.prepared:
            self.files.prepare()
        self._starting = asyncio.create_task(self._start(), name="start")
        for early in self._early_signals:  # arrived before the handlers above: acted on as if after
            loop.call_soon(self._on_signal, early)
        try:
            await self._starting
        except asyncio.CancelledError:
            if not self._signals:
                raise
            log.info("stopped by a signal before ready")
            return 0
        try:
            self.state = S.BROKER_STATE_SERVING
            self._idle_since = time.monotonic()
            self._spawn(self.health.run(), "health")
            self._spawn(self._watch_app_server(), "app-server")
            self._spawn(self._idle_loop(), "idle")
            self._spawn(self._age_watch(), "age")
            self._spawn(self._wedge_watch(), "wedge")
            if self._drain_asked:
                self.drain(None, reason=self._drain_asked)
            serving = await self.health.publish()
            app_pid = self.app.pid if self.app else None
            log.info("ready endpoint=%s pid=%d app_server_pid=%s instance=%s", self.config.endpoint, os.getpid(),
                     app_pid, self.config.instance_id,
                     extra={"event": "ready", "fields": {"endpoint": self.config.endpoint, "app_server_pid": app_pid,
                                                         "instance": self.config.instance_id}})
            if serving:  # else the app-server is already gone, and the broker about to stop
                self.ready.set()
                self.notify.ready(self._status_text())
                if self.notify.enabled:
                    self._spawn(self._notify_loop(), "notify")
            await self._stop.wait()
        finally:
            await self._shutdown()
        return self._exit_code

    def _spawn(self, coro: Any, name: str) -> None:
        """A background task of the broker's life: should it raise, the broker stops (exit 1)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("the broker's %s task failed: stopping", task.get_name(), exc_info=exc)
        self.stop(1)

    async def _start(self) -> None:
        try:
            await self._start_app_server()
            await self._listen()
        except BaseException:
            if self.app is not None:
                await self.app.stop(polite_wait=0.5, term_wait=1.0)
            elif self._child is not None:
                child_process.kill(self._child)
            if self.reaper is not None:
                await self.reaper.stop_descendants()
            if self.jsonl is not None:
                self.jsonl.stop()
            if self.metrics_server is not None:
                self.metrics_server.stop()
            for server in (self.server, self.health_server):
                if server is not None:
                    await server.stop(None)
            self.files.remove()
            raise

    async def _start_app_server(self) -> None:
        cfg = self.config
        self.pacer = pacer = scheduling.StreamPacer(asyncio.get_running_loop())
        on_chunk = self.hub.from_app_server_chunk
        if pacer.enabled:  # the stream's rate decides the event loop's scheduling policy
            route, saw = on_chunk, pacer.saw

            def on_chunk(body: bytes) -> None:
                saw(len(body))
                route(body)
        app = AppServerProcess(cfg.app_server, cwd=cfg.cwd, env=None, on_chunk=on_chunk,
                               max_line=cfg.max_line_bytes)
        child, self._child = self._child, None
        await app.start(child)  # ConfigError when the command cannot run; the child is gone on failure
        self.app = app
        try:
            self.app_server_create_time_ms = int(psutil.Process(self.app.pid).create_time() * 1000)
        except psutil.Error:
            pass
        log.info("starting version=%s endpoint=%s cwd=%s instance=%s; app-server pid=%s command=%s", self.version,
                 cfg.endpoint, cfg.cwd, cfg.instance_id, self.app.pid, " ".join(cfg.app_server))
        await self._handshake()

    async def _handshake(self) -> None:
        assert self.app is not None
        params = {"clientInfo": {"name": "codex-broker", "title": "codex-broker", "version": self.version},
                  "capabilities": {"experimentalApi": True}}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.hub.request(CALL, "initialize", params, future=future, counted=False)
        gone: asyncio.Future[Any] = asyncio.ensure_future(self.app.wait_gone())
        try:
            done, _ = await asyncio.wait([future, gone], timeout=self.config.start_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future in done:
            reply = future.result()
            if "error" in reply:
                raise StartError(f"app-server refused initialize: {jsonrpc.dumps_text(reply['error'])}")
            self.hub.init_result = reply.get("result")
            self.app.send(jsonrpc.dumps({"method": "initialized"}))
            return
        if done:
            raise StartError(f"{self.app.describe_exit()} before answering initialize")
        raise StartError(f"app-server did not answer initialize within {self.config.start_timeout:g} s")

    async def _listen(self) -> None:
        cfg = self.config
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", -1),
                   ("grpc.so_reuseport", 0),
                   # clients ping every few seconds to notice a broker that stopped answering
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                   ("grpc.http2.max_ping_strikes", 0)]
        interceptors = []
        if self.files.token:  # --token-file
            from proxy.auth import BearerTokenInterceptor

            interceptors.append(BearerTokenInterceptor(self.files.token, health_reflection()))
        server = grpc.aio.server(options=options, interceptors=interceptors)
        add_app_server_service(server, AppServerService(self))
        broker_pb2_grpc.add_BrokerServicer_to_server(BrokerService(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        names = (broker_pb2.DESCRIPTOR.services_by_name["AppServer"].full_name,
                 broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        if cfg.socket_path is None:
            host, port = parse_tcp_endpoint(cfg.endpoint)
            try:
                bound = server.add_insecure_port(f"{host}:{port}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on {cfg.endpoint}: {exc}") from None
            cfg.endpoint = f"tcp:{host}:{bound}"  # the port chosen when 0 was asked for
        else:
            try:
                server.add_insecure_port(f"unix:{cfg.socket_path}")
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on {cfg.endpoint}: {exc}") from None
            os.chmod(cfg.socket_path, 0o600)
        await server.start()
        self.server = server
        if cfg.health_endpoint is not None:
            await self._listen_health(options)
        jsonl_path = cfg.jsonl_socket_path
        if jsonl_path is not None:  # its path may be taken: ConfigError, and _start stops gRPC again
            from proxy.jsonl import JsonlServer

            self.jsonl = JsonlServer(self.hub, jsonl_path, max_line=cfg.max_message_bytes,
                                     on_shutdown=self.request_drain)
            await self.jsonl.start()
        if self.metrics is not None:  # its port may be taken: ConfigError, and _start stops the others
            from proxy.metrics import MetricsServer

            self.metrics_server = MetricsServer(self.metrics, cfg.metrics_address())
            await self.metrics_server.start()
        self.files.write_pid()

    async def _listen_health(self, options: list[tuple[str, Any]]) -> None:
        """The health endpoint: Health and reflection of Health only, no token, any address."""
        cfg = self.config
        assert cfg.health_endpoint is not None
        server = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(health_reflection(), server)
        self.health_server = server  # stopped with the broker's gRPC, whatever happens next
        path = cfg.health_socket_path
        try:
            if path is None:
                host, port = parse_tcp_endpoint(cfg.health_endpoint)
                bound = server.add_insecure_port(f"{host}:{port}")
                cfg.health_endpoint = f"tcp:{host}:{bound}"
            else:
                server.add_insecure_port(f"unix:{path}")
                self.files.health_socket = path
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {cfg.health_endpoint}: {exc}") from None
        await server.start()
        log.info("health endpoint=%s", cfg.health_endpoint)

    # -- events --------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        """SIGTERM and SIGINT ask for a drain (one drain, however many); a second SIGINT stops now."""
        self._signals += 1
        self._sigints += sig == signal.SIGINT
        name = signal.Signals(sig).name
        if self.state == S.BROKER_STATE_STARTING:
            log.info("%s while starting: giving up", name)
            if self._starting is not None:
                self._starting.cancel()
        elif sig == signal.SIGINT and self._sigints > 1:
            log.info("second SIGINT: stopping now")
            self.stop(0)
        elif self.state == S.BROKER_STATE_DRAINING:
            log.info("%s while draining: the drain goes on", name)
        else:
            self.drain(None, reason=name)

    def request_drain(self, reason: str) -> None:
        """A client's request to shut down (JSONL ``broker/shutdown``): a drain with the default
        deadline, joined with any drain already under way (as repeated SIGTERMs are), which it
        never shortens."""
        if self.state == S.BROKER_STATE_SERVING:
            self.drain(None, reason=reason)
        elif self.state == S.BROKER_STATE_STARTING:  # listening, not SERVING yet: drains once it is
            self._drain_asked = self._drain_asked or reason
        else:
            log.info("%s while %s: the drain goes on", reason, self.state_name.lower())

    def drain(self, deadline_seconds: float | None, *, reason: str, force: bool = False) -> None:
        """SERVING -> DRAINING. Idempotent: a later call may shorten the deadline, never extend it.
        ``deadline_seconds``: see ``drain_seconds`` (None = the broker's default)."""
        if self.state == S.BROKER_STATE_STOPPING:
            return
        seconds = drain_seconds(deadline_seconds, self.config.drain_deadline)
        if deadline_seconds is not None and seconds < deadline_seconds:
            log.info("drain deadline of %g s cut to %g s (%s)", deadline_seconds, seconds, reason)
        deadline = time.monotonic() + (0.0 if force else seconds)
        first = self.state != S.BROKER_STATE_DRAINING
        if first:
            self.state = S.BROKER_STATE_DRAINING
            self.hub.draining = True
            if self.jsonl is not None:  # a client's next connect finds no broker here and starts one
                self.jsonl.close_listener()
            self.drain_reason = reason
            self._drain_deadline = deadline
            log.info("drain started (%s): deadline %.0f s, %d turns and %d requests in flight%s", reason,
                     deadline - time.monotonic(), len(self.hub.turns), self.hub.pending_work,
                     ", interrupting turns now" if force else "")
            self.notify.stopping(self._status_text())
            self._spawn(self._drain(), "drain")
            self._spawn(self.health.publish(), "publish")
        elif self._drain_deadline is not None and deadline < self._drain_deadline:
            self._drain_deadline = deadline
            log.info("drain deadline shortened to %.0f s (%s)", deadline - time.monotonic(), reason)
        self._force = self._force or force
        self._change.set()

    async def _drain(self) -> None:
        while self.hub.in_flight:
            assert self._drain_deadline is not None
            remaining = self._drain_deadline - time.monotonic()
            if remaining <= 0:
                break
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), remaining)
            except TimeoutError:
                pass
        if self.health.wedged():
            # Nothing will answer: waiting for turn/completed or responses only delays the stop.
            log.warning("app-server is wedged: stopping without waiting for %d turns and %d requests",
                        len(self.hub.turns), self.hub.pending_work)
        else:
            if self.hub.turns:
                log.info("drain deadline reached: interrupting %d turns", len(self.hub.turns))
                self._interrupt_turns()
                await self._wait_until(lambda: not self.hub.turns, INTERRUPT_GRACE)
            await self._wait_until(lambda: not self.hub.in_flight, FORCE_GRACE)
        log.info("drain complete")
        self.stop(0)

    def _interrupt_turns(self) -> None:
        for turn in list(self.hub.turns.values()):
            try:
                self.hub.request("internal", "turn/interrupt", {"threadId": turn.thread_id, "turnId": turn.turn_id})
            except AppServerGone:
                return

    async def _wait_until(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), remaining)
            except TimeoutError:
                pass
        return True

    async def _idle_loop(self) -> None:
        timeout = self.config.idle_timeout
        if timeout <= 0:
            return
        while self.state == S.BROKER_STATE_SERVING:
            since = self._idle_since
            if since is not None and time.monotonic() - since >= timeout:
                log.info("idle for %.0f s with no Sessions and no work: stopping", timeout)
                self.stop(0)
                return
            wait = timeout if since is None else since + timeout - time.monotonic()
            await asyncio.sleep(min(max(wait, 0.05), 1.0))

    def age(self) -> float:
        """Seconds since the start, by whichever clock says more: the monotonic one (a wall
        clock stepped back) or the wall one (time asleep, which lifecycle's ensure counts too)."""
        return max(time.monotonic() - self._mono0, time.time() - self.started_at)

    async def _age_watch(self) -> None:
        """Past its max age the broker drains itself: NOT_SERVING, no new work, turns in
        flight finish, then exit 0. Checked at most every AGE_TICK seconds."""
        limit = self.config.max_age_seconds
        if limit <= 0:
            return
        while True:
            remaining = limit - self.age()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, AGE_TICK))
        if self.state == S.BROKER_STATE_SERVING:
            self.drain(None, reason=f"max age {limit / 3600:g} h reached")

    async def _wedge_watch(self) -> None:
        """An app-server wedged for --exit-when-wedged seconds without a break (any answer
        starts the count again) ends the broker: ``_exit_wedged``."""
        limit = self.config.exit_when_wedged
        if limit <= 0:
            return
        while True:
            wedged = self.health.wedged_for()
            if wedged >= limit:
                self._exit_wedged(wedged)
                return
            await asyncio.sleep(min(max(limit - wedged, 0.05), WEDGE_TICK))

    def _exit_wedged(self, wedged: float) -> None:
        """Nobody is handed a broken broker: the socket's path goes at once (no new connection),
        pending work fails with the reason, and the broker stops (exit 1), killing the
        app-server's group without the polite waits."""
        if self.hub.gone is not None or self._stop.is_set():
            return
        why = (f"app-server wedged for {wedged:.1f} s (exit-when-wedged {self.config.exit_when_wedged:g} s): "
               "the broker is exiting")
        self.files.remove_socket()
        if self.jsonl is not None:
            self.jsonl.close_listener()
        log.error("%s; no longer listening; failing %d turns and %d requests and stopping", why,
                  len(self.hub.turns), self.hub.pending_work)
        self._app_wedged = True
        self.hub.app_server_gone(why)
        self.stop(1)

    async def _watch_app_server(self) -> None:
        """The app-server exited, or closed its stdout: either way nothing more will come."""
        assert self.app is not None
        await self.app.wait_gone()
        if self.state == S.BROKER_STATE_STOPPING:
            return
        why = self.app.describe_exit()
        if self.metrics is not None:
            self.metrics.app_server_exits += 1
        log.error("%s; failing %d pending requests and stopping", why, self.hub.pending_work)
        self.hub.app_server_gone(why)
        await self.health.publish()
        self.stop(1)

    def _app_server_wedged(self) -> None:
        """From the health loop while the app-server counts as wedged. Serving, the broker only
        says NOT_SERVING (the app-server may come back; lifecycle replaces a wedged broker).
        Draining, nothing will finish the turns: their clients hear it now, and the broker
        stops (exit 1) instead of waiting out the deadline."""
        if self.state != S.BROKER_STATE_DRAINING or self.hub.gone is not None:
            return
        waited = time.monotonic() - (self.hub.oldest_pending() or time.monotonic())
        why = f"app-server stopped answering (a request unanswered for {waited:.1f} s) while the broker was draining"
        log.error("%s; failing %d turns and %d requests and stopping", why, len(self.hub.turns),
                  self.hub.pending_work)
        self._app_wedged = True
        self.hub.app_server_gone(why)
        self.stop(1)

    def _status_text(self) -> str:
        return status_text(len(self.hub.sessions), len(self.hub.turns), self.state_name)

    def app_server_healthy(self) -> bool:
        """The app-server answers (or has nothing to answer): the watchdog's condition."""
        return self.app is not None and self.app.alive and self.hub.gone is None and not self.health.wedged()

    async def _notify_loop(self) -> None:
        """Under systemd: STATUS= when it changed, and WATCHDOG=1 every half WATCHDOG_USEC while
        the app-server is healthy (draining too). A wedged app-server gets no ping, so systemd's
        WatchdogSec restarts the broker even without --exit-when-wedged."""
        interval = self.notify.watchdog
        tick = NOTIFY_TICK if interval is None else min(NOTIFY_TICK, interval / 2)
        next_ping = time.monotonic()
        while True:
            self.notify.status(self._status_text())
            now = time.monotonic()
            if interval is not None and now >= next_ping and self.app_server_healthy():
                self.notify.ping()
                next_ping = now + interval
            wait = tick if interval is None or now >= next_ping else min(tick, next_ping - now)
            await asyncio.sleep(wait)

    def stop(self, code: int) -> None:
        self.hub.stopping = True  # at once, not when _shutdown gets to run
        if not self._stop.is_set():
            self._exit_code = code
            self._stop.set()

    async def _shutdown(self) -> None:
        """Each step runs even if an earlier one failed; the app-server, the descendants and
        the files are always taken care of."""
        self.stop(self._exit_code)  # for a shutdown not asked for by stop(): a cancelled run()
        self.state = S.BROKER_STATE_STOPPING
        self.notify.stopping(self._status_text())
        if self.jsonl is not None:
            self.jsonl.close_listener()
        log.info("stopping: %d sessions open, %d turns in flight", len(self.hub.sessions), len(self.hub.turns))
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await self.health.publish()
            handlers = [s.handler for s in self.hub.sessions.values() if s.handler is not None]
            for session in list(self.hub.sessions.values()):
                session.end(Ending())
            if handlers:
                await asyncio.wait(handlers, timeout=SESSION_FLUSH)
        finally:
            try:
                await self._stop_children()
            finally:
                try:
                    await self._stop_grpc()
                finally:
                    if self.jsonl is not None:
                        self.jsonl.stop()
                    if self.metrics_server is not None:
                        self.metrics_server.stop()
                    self.files.remove()
                    self.notify.close()
                    log.info("stopped exit_code=%d", self._exit_code,
                             extra={"event": "stopped", "fields": {"exit_code": self._exit_code}})

    async def _stop_children(self) -> None:
        if self.pacer is not None:
            self.pacer.close()
        if self.app is not None:
            # a stopped or hung child ignores stdin EOF and SIGTERM
            wedged = self._app_wedged or self.health.wedged()
            code = await self.app.stop(polite_wait=0.2 if wedged else 2.0, term_wait=0.3 if wedged else 2.0)
            log.info("app-server stopped (%s)", self.app.describe_exit() if code is not None else "no status")
            # What it left unanswered (a Call the stop did not wait for) is answered now, with
            # an error a client may retry, while gRPC can still send it: not cancelled later.
            self.hub.app_server_gone(f"the broker stopped before the app-server answered "
                                     f"({self.app.describe_exit() if code is not None else 'app-server stopped'})")
        if self.reaper is not None:
            await self.reaper.stop_descendants()

    async def _stop_grpc(self) -> None:
        await self.health.servicer.enter_graceful_shutdown()  # Watches say NOT_SERVING and end
        # New RPCs are refused from here; calls still in flight (a Call answered by the
        # drain's last response, a Drain's own reply) get their replies out.
        await asyncio.gather(*(server.stop(STOP_GRACE) for server in (self.server, self.health_server)
                               if server is not None))
        await asyncio.gather(*self._tasks, return_exceptions=True)
