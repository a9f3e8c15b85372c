"""Prometheus metrics of one broker (``serve --metrics-endpoint tcp:HOST:PORT``).

Each broker has its own registry (``BrokerMetrics.registry``), so brokers embedded in one
process never mix their numbers. Most values are read when scraped, from what the broker keeps
anyway: the hub's ``Counts`` (plain ints and Counters bumped where things happen; the hot path,
``Hub.from_app_server_lines``, adds once per chunk of lines, never per message), its Sessions
and turns, the broker's state. Only the two histograms are observed as events happen: a turn's
duration when it ends, a health probe's latency when it is answered.

Label values are bounded: transports (grpc, jsonl), request methods from the hub's fixed list
(``hub.METRIC_METHODS``; anything else a client sends is "other"), outcomes, and states.

The exposition is served on the broker's own event loop (``MetricsServer``: asyncio, one
request per connection, GET only), so a scrape reads the hub between two routing steps, never
in the middle of one, and no thread touches the hub. It binds to a loopback address unless
``--allow-remote``, as the TCP endpoint does."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from proxy.config import ConfigError

if TYPE_CHECKING:
    from proxy.broker import Broker

log = logging.getLogger("codex_broker.proxy")

PREFIX = "codex_broker"
TRANSPORTS = ("grpc", "jsonl")
STATES = ("STARTING", "SERVING", "DRAINING", "STOPPING")
TURN_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
REQUEST_HEAD_LIMIT = 8192  # bytes of request line and headers a scrape may send
READ_TIMEOUT = 5.0


class BrokerMetrics(Collector):
    """The registry of one broker: the collector below plus the two histograms."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.registry = CollectorRegistry(auto_describe=False)
        self.turn_seconds = Histogram(f"{PREFIX}_turn_duration_seconds", "Turns, from begun to turn/completed",
                                      buckets=TURN_BUCKETS, registry=self.registry)
        self.probe_seconds = Histogram(f"{PREFIX}_health_probe_latency_seconds",
                                       "Health probes, from sent to answered by the app-server",
                                       buckets=PROBE_BUCKETS, registry=self.registry)
        self.app_server_exits = 0
        self.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        broker = self.broker
        hub = broker.hub
        counts = hub.counts
        open_now = GaugeMetricFamily(f"{PREFIX}_sessions_open", "Sessions open now", labels=["transport"])
        opened = CounterMetricFamily(f"{PREFIX}_sessions_opened", "Sessions opened", labels=["transport"])
        slow = CounterMetricFamily(f"{PREFIX}_sessions_dropped_slow",
                                   "Sessions dropped for falling further behind than their buffer allows",
                                   labels=["transport"])
        checks = CounterMetricFamily(f"{PREFIX}_connection_checks",
                                     "Connections closed without sending anything (a client's connect-and-close "
                                     "check), not counted as Sessions", labels=["transport"])
        by_transport = {t: 0 for t in TRANSPORTS}
        for session in hub.sessions.values():
            if session.counted:
                by_transport[session.transport] = by_transport.get(session.transport, 0) + 1
        for transport in sorted(set(TRANSPORTS) | set(by_transport) | set(counts.sessions_opened)):
            open_now.add_metric([transport], by_transport.get(transport, 0))
            opened.add_metric([transport], counts.sessions_opened[transport])
            slow.add_metric([transport], counts.slow_drops[transport])
            checks.add_metric([transport], counts.checks[transport])
        yield from (open_now, opened, slow, checks)

        requests = CounterMetricFamily(f"{PREFIX}_requests",
                                       "Client requests by how they came (session, call), method and outcome",
                                       labels=["via", "method", "outcome"])
        for (via, method, outcome), n in sorted(counts.requests.items()):
            requests.add_metric([via, method, outcome], n)
        yield requests

        yield GaugeMetricFamily(f"{PREFIX}_turns_in_flight", "Turns begun and not completed", value=len(hub.turns))
        yield GaugeMetricFamily(f"{PREFIX}_requests_pending", "Client requests the app-server has not answered",
                                value=hub.pending_work)

        messages = CounterMetricFamily(f"{PREFIX}_messages_routed", "Messages routed, by where they came from",
                                       labels=["source"])
        messages.add_metric(["app_server"], counts.lines_from_app_server)
        messages.add_metric(["client"], counts.messages_from_clients)
        routed = CounterMetricFamily(f"{PREFIX}_bytes_routed", "Bytes of messages routed, by where they came from",
                                     labels=["source"])
        routed.add_metric(["app_server"], counts.bytes_from_app_server)
        routed.add_metric(["client"], counts.bytes_from_clients)
        yield from (messages, routed)

        yield CounterMetricFamily(f"{PREFIX}_app_server_exits",
                                  "Times the app-server exited (or closed its stdout) while the broker served",
                                  value=self.app_server_exits)
        state = GaugeMetricFamily(f"{PREFIX}_state", "The broker's state: 1 for the current one",
                                  labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if broker.state_name == name else 0.0)
        yield state


class MetricsServer:
    """The exposition over HTTP/1.1 on the broker's loop: ``GET /metrics`` (or ``/``) gets the
    registry in the format its Accept header asks for (prometheus-client's choice, as its own
    server makes it); anything else 404 or 405. One request per connection."""

    def __init__(self, metrics: BrokerMetrics, address: tuple[str, int]):
        self.metrics = metrics
        self.host, self.port = address
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp:{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host.strip("[]"), self.port,
                                                      limit=REQUEST_HEAD_LIMIT)
        except OSError as exc:
            raise ConfigError(f"cannot listen on --metrics-endpoint {self.endpoint}: {exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]  # the port chosen when 0 was asked for
        log.info("metrics on %s", self.endpoint)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, body, kind = self._answer(head)
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status.encode(), kind.encode(), len(body)) + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/"):
            return "404 Not Found", b"not found: try /metrics\n", "text/plain"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        accept = ""
        for header in head.split(b"\r\n")[1:]:
            name, _, field = header.partition(b":")
            if name.strip().lower() == b"accept":
                accept = field.strip().decode("latin-1")
        encode, kind = choose_encoder(accept)  # the text format, or OpenMetrics when asked for
        body = encode(self.metrics.registry)
        return "200 OK", body, kind
