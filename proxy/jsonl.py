"""The JSONL front end: Sessions over a unix socket, one JSON object per line each way.

A second adapter over the same hub as the gRPC one (service.py): each connection is one
Session with every rule the hub gives a Session (ids rewritten and restored, per-thread routing,
opt-outs, server requests fanned out, order kept). What is particular to this transport is here
and only here: framing, the errors it writes as lines, the end of input, ``broker/shutdown``.

Framing. In: UTF-8, one message per line ending in ``\\n``; a trailing ``\\r`` is dropped, blank
lines are skipped. A line longer than the message limit is skipped to its next ``\\n`` as it
arrives (never buffered whole) and answered with one -32600 (id null); the connection stays
open. A connection whose first line is an HTTP/2 preface (a gRPC client at the wrong socket) is
closed quietly. Out: every message the hub queues is already one line of JSON (the app-server's
own lines, or the broker's compact encoding), written with its ``\\n``; nothing else is ever
written.

Flow. Lines are routed one at a time in arrival order. Fast path: a line under the hub's
``LARGE_LINE`` that nothing waits before (no queued line, no big message being routed) is routed
at once, as it arrives, with ``hub.route`` (what ``hub.receive`` does for such a line without
yielding): one loop pass less per request. Any other line waits in order for the connection's
routing task (``hub.receive`` may yield for a big message); reading pauses while more than
``INBOUND_LIMIT`` bytes of lines wait, so a connection holds at most that plus one line. A fault
while routing ends the Session (INTERNAL) on either path. Writing waits while the socket's buffer
is over its high-water mark, so a client that does not read makes its Session's bounded buffer
grow, and the hub drops it at its limit: the connection gets one last line, -32001 "Server
overloaded; retry later." (id null), at a message boundary (only whole batches are ever written),
then is closed.

End of input. When the client closes its side, what it sent before is routed, what is queued
for it is written, and the connection is closed at once: its pending requests' answers are
dropped and its turns keep running, as on a disconnect. (A gRPC Session that half-closes keeps
receiving until its turns end; a JSONL client's close waits for the broker to close.) A
connection that opens and closes at once costs one Session opened and closed; the metrics count
it as a connect-and-close check, not as a Session (a Session is counted at its first line).

Draining. ``broker/shutdown`` is answered ``{}`` at once and asks the broker for a drain (one
request, however many; it never shortens one under way). New work on a JSONL Session while the
broker drains gets -32001 with ``data.reason = "serverShuttingDown"``. The listener itself is
closed and its path removed when a drain starts (``JsonlServer.close_listener``)."""
from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable
from typing import Any, cast

from proxy import jsonrpc
from proxy.config import LIVE, ConfigError, socket_liveness
from proxy.hub import LARGE_LINE, Hub
from proxy.session import Ending, EndReason, Session

log = logging.getLogger("codex_broker.proxy")

TRANSPORT = "jsonl"
INBOUND_LIMIT = 1 << 20  # bytes of lines waiting to be routed before reading pauses
WRITE_HIGH_WATER = 1 << 20  # bytes in the socket's buffer before writing waits
CLOSE_GRACE = 10.0  # seconds a closed connection gets to flush its last lines before it is aborted
HTTP2_PREFACE = b"PRI * HTTP/2"  # how a gRPC client's connection starts
SHUTDOWN_METHOD = "broker/shutdown"
_SHUTDOWN_BYTES = SHUTDOWN_METHOD.encode()  # lines without it are not looked at twice

DRAINING_ERROR: dict[str, Any] = {
    "code": jsonrpc.OVERLOADED,  # the code on which a companion runs the work elsewhere
    "message": "Server is draining; retry after reconnecting",
    "data": {"reason": "serverShuttingDown"},
}


def _final_error(reason: EndReason, details: str) -> dict[str, Any] | None:
    """The last line a connection gets when its Session ends for ``reason`` (None: no line)."""
    if reason is EndReason.SLOW_CLIENT:
        return jsonrpc.OVERLOADED_ERROR
    if reason is EndReason.INTERNAL:
        return jsonrpc.error(jsonrpc.INTERNAL_ERROR, details)
    if reason is EndReason.APP_SERVER_GONE:
        return jsonrpc.error(jsonrpc.APP_SERVER_EXITED, details)
    return None


class _TooLong:
    """A line over the message limit, skipped."""


class _EndOfInput:
    """The client closed its side (or the connection is gone)."""


_TOO_LONG = _TooLong()
_END = _EndOfInput()
_Item = bytes | _TooLong | _EndOfInput


class Connection(asyncio.Protocol):
    """One JSONL client: the bytes in, split into lines, and one task that routes them and
    writes the Session's messages out."""

    def __init__(self, server: JsonlServer):
        self.server = server
        self.hub = server.hub
        self.max_line = server.max_line
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self._buf = bytearray()
        self._skipping = False
        self._first_line = True
        self._lines: collections.deque[_Item] = collections.deque()
        self._big = False  # the routing task is routing a big message (it may yield meanwhile)
        self._queued = 0
        self._reading_paused = False
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = asyncio.Event()
        self._quiet = False  # not a JSONL client: nothing is written to it
        self._task: asyncio.Task[None] | None = None
        self._finished = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's are not subclasses)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # Counted as a Session once it sends a line: a client's connect-and-close check is not one.
        self.session = self.hub.open_session(transport=TRANSPORT, draining_error=DRAINING_ERROR, counted=False)
        self._task = asyncio.create_task(self._serve(self.session), name=f"jsonl {self.session.id}")
        # A task cancelled before it first runs (its Session dropped at once) skips its finally.
        self._task.add_done_callback(lambda _: self._finish(self.session) if self.session else None)
        self.session.handler = self._task
        self.session.on_push = self._push_now
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._quiet:
            return
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
                self._put(_TOO_LONG)
            elif self._buf:
                self._buf += memoryview(data)[start:nl]
                line = bytes(self._buf)
                self._buf.clear()
                self._line(line)
            else:
                self._line(data[start:nl])
            start = nl + 1
            if self._quiet:
                return
        if self._skipping or start == len(data):
            return
        if len(self._buf) + len(data) - start > self.max_line:
            self._buf.clear()  # over the limit: the rest of this line is skipped as it arrives
            self._skipping = True
        else:
            self._buf += memoryview(data)[start:]

    def eof_received(self) -> bool:
        self._put(_END)
        return True  # keep the socket open for writing: the Session's last lines go out first

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self._writable.set()
        self._put(_END)
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- lines in ------------------------------------------------------------------------
    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._first_line:
            self._first_line = False
            if line.startswith(HTTP2_PREFACE):
                log.info("jsonl connection %s: an HTTP/2 client, not JSON lines; closed",
                         self.session.id if self.session else "?")
                self._quiet = True
                self._put(_END)
                return
        if len(line) > self.max_line:
            self._put(_TOO_LONG)
        elif line and not line.isspace():
            session = self.session
            if self._lines or self._big or len(line) >= LARGE_LINE or _SHUTDOWN_BYTES in line or session is None:
                self._put(line)  # in order, after what waits, by the routing task
                return
            self.hub.count_session(session)  # a Session, not a connect-and-close check
            try:
                self.hub.route_line(session, line)
            except Exception as exc:  # noqa: BLE001 - the broker's own fault: this Session ends, the broker goes on
                self._routing_failed(session, exc)

    def _put(self, item: _Item) -> None:
        self._lines.append(item)
        if isinstance(item, bytes):
            self._queued += len(item)
            if self._queued > INBOUND_LIMIT and not self._reading_paused and self.transport is not None:
                self._reading_paused = True
                self.transport.pause_reading()
        self._arrived.set()

    async def _next_line(self) -> _Item:
        while not self._lines:
            self._arrived.clear()
            await self._arrived.wait()
        item = self._lines.popleft()
        if isinstance(item, bytes):
            self._queued -= len(item)
            if self._reading_paused and self._queued <= INBOUND_LIMIT // 2 and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
        return item

    async def _read(self, session: Session) -> None:
        """Routes the client's lines in order, each one before the next; at the end of input,
        ends the Session (what is queued is still written)."""
        hub = self.hub
        while True:
            item = await self._next_line()
            if isinstance(item, _EndOfInput):
                hub.close_session(session)
                return
            hub.count_session(session)
            if isinstance(item, _TooLong):
                hub.refuse(session, jsonrpc.Refusal(jsonrpc.error(
                    jsonrpc.INVALID_REQUEST, f"Invalid request: line longer than {self.max_line} bytes")))
                continue
            if _SHUTDOWN_BYTES in item and self._shutdown(session, item):
                continue
            if len(item) < LARGE_LINE:
                hub.route_line(session, item)
                continue
            self._big = True
            try:
                await hub.receive(session, item)
            finally:
                self._big = False

    def _shutdown(self, session: Session, line: bytes) -> bool:
        """``broker/shutdown``: answered ``{}`` at once (a request), then a drain is asked for.
        False when the line is anything else."""
        message = jsonrpc.read_client_message(line)
        if isinstance(message, jsonrpc.Refusal) or message.method != SHUTDOWN_METHOD:
            return False
        if message.id is not None and message.kind is jsonrpc.Kind.REQUEST:
            session.push(jsonrpc.encode({"id": message.id, "result": {}}))
        self.server.on_shutdown(f"{SHUTDOWN_METHOD} from JSONL session {session.id}")
        return True

    # -- the connection's life -----------------------------------------------------------
    async def _serve(self, session: Session) -> None:
        """Writes the Session's messages until it ends, then the ending's last line if it has
        one, then closes the connection. A fault while routing ends the Session (INTERNAL)."""
        reader = asyncio.create_task(self._read(session))
        reader.add_done_callback(lambda task: self._reader_done(session, task))
        try:
            while (batch := await session.next_batch()) is not None:
                if not self._writable.is_set():
                    await self._writable.wait()
                if self._lost.is_set():
                    break
                batch.append(b"")
                self._write(b"\n".join(batch))
        except asyncio.CancelledError:
            if session.ending is None or session.ending.ok:
                raise  # the broker is stopping
        finally:
            reader.cancel()
            self._finish(session)

    def _push_now(self) -> None:
        """What the Session queues is written at once while the socket takes it (the usual
        case: an answer leaves in the loop pass that routed it); once the transport pauses,
        the rest waits for _serve, which writes it when the socket drains. All writes happen
        in queue order, from the loop, so the order is the app-server's."""
        session = self.session
        while session is not None and self._writable.is_set() and not self._lost.is_set() and not self._quiet:
            batch = session.take_batch()
            if not batch:
                return
            batch.append(b"")
            self._write(b"\n".join(batch))  # may pause writing: then the loop ends

    def _reader_done(self, session: Session, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self._routing_failed(session, exc)

    def _routing_failed(self, session: Session, exc: BaseException) -> None:
        log.error("jsonl session %s: internal error while routing a client message; ending it", session.id,
                  exc_info=exc)
        session.end(Ending(EndReason.INTERNAL, f"internal error in the broker: {exc!r}"[:1000]))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self._quiet and not self.transport.is_closing():
            self.transport.write(data)

    def _finish(self, session: Session) -> None:
        """The Session is over: its ending's last line, if any, then the connection is closed
        (aborted if it cannot flush within CLOSE_GRACE). Once only."""
        if self._finished:
            return
        self._finished = True
        self.hub.close_session(session)
        ending = session.ending
        if ending is not None and not ending.ok:
            error = _final_error(ending.reason, ending.details)
            if error is not None:
                self._write(jsonrpc.error_response(None, error) + b"\n")
        self.close()

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()  # what is buffered is flushed first
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class JsonlServer:
    """The JSONL listener on one unix socket path, and its connections."""

    def __init__(self, hub: Hub, path: str, *, max_line: int, on_shutdown: Callable[[str], None]):
        self.hub = hub
        self.path = path
        self.max_line = max_line
        self.on_shutdown = on_shutdown
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Listens on the path (created 0600). ConfigError when the path is taken: it accepts
        connections (another broker serves it), or it is not a socket. A socket nobody listens
        on is stale and replaced."""
        path = self.path
        _check_free(path)
        try:
            server = await asyncio.get_running_loop().create_unix_server(lambda: Connection(self), path=path)
        except OSError as exc:
            raise ConfigError(f"cannot listen on JSONL socket {path}: {exc.strerror or exc}") from None
        self._server = server
        os.chmod(path, 0o600)
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)
        log.info("jsonl listening on %s", path)

    def close_listener(self) -> None:
        """No new connections, and the path removed (only if it is still our socket); the open
        connections go on. Idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
            log.info("jsonl listener closed: %s removed", self.path)
        self._remove_path()

    def _remove_path(self) -> None:
        if self._inode is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None

    def stop(self) -> None:
        """At the broker's end: the listener closed, every connection aborted."""
        self.close_listener()
        for connection in list(self.connections):
            connection.abort()


def _check_free(path: str) -> None:
    """ConfigError unless ``path`` is free to listen on, or a stale socket (replaced): the same
    rule as the gRPC socket's (proxy.config.socket_liveness)."""
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError(f"directory of the JSONL socket does not exist: {os.path.dirname(path)}")
    if socket_liveness(path, "JSONL socket") == LIVE:
        raise ConfigError(f"JSONL socket path is already in use: {path} (another broker may be serving it)")
