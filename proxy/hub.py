"""The multiplexer: many Sessions and Calls share one app-server.

All routing is synchronous and runs on the event loop, in the order lines arrive, so each
Session sees messages in exactly the order the app-server wrote them.

- Request ids are rewritten to proxy-unique integers and mapped back on the response.
- A Session subscribes to a thread by sending a request that names it (``params.threadId``) or
  by receiving a result that hands it one (``thread.id``, ``threadId``, ``reviewThreadId``).
- Notifications with ``params.threadId`` go to that thread's subscribers, others to everyone;
  each Session's ``optOutNotificationMethods`` are filtered out for it alone.
- Server->client requests go to the thread's subscribers under one broker-local id; the first
  answer wins, and when no one is left to answer the app-server hears an error.
- In-flight work = requests awaiting a response + turns begun and not yet completed.

Sub-agents. A turn can spawn sub-agent threads, whose messages carry their own thread id, which
no client asked for. The hub remembers which thread spawned which (``parents``/``children``,
read by ``jsonrpc.spawned_threads``): from the spawning thread's ``collabAgentToolCall`` item
(``senderThreadId`` -> ``receiverThreadIds``; tools spawnAgent and resumeAgent; such an
item/started or item/completed leaves the hot path), and from a ``thread/started`` whose thread
names its parent (``parentThreadId``, or ``source.subAgent.thread_spawn.parent_thread_id``). The
first link of a thread wins; a link that would close a cycle is refused. Subscriptions propagate
down: whoever follows a thread follows its sub-agents, nested ones included, both when a
sub-agent is linked and when a Session subscribes later (thread/resume of the parent). So
``threads[child]`` already holds the parent's Sessions: a sub-agent's notifications and server
requests are routed like any thread's, on the same hot path, and reach no other client.
- Order. A sub-agent's first messages can come before the item that links it (codex 0.169 names
  the sub-agent only when the spawn item completes, while the sub-agent already runs): the last
  notifications no Session followed are kept in a bounded ring (``ORPHAN_MESSAGES``,
  ``ORPHAN_BYTES``), and a thread's are delivered in order to its followers when it is linked,
  before the linking item. A ``thread/started`` that names its parent goes to that parent's
  followers; one that names none (a client's fake writes it before the collab item) has no
  thread to route by and goes to every Session, as any message without a threadId does.
- Turns. A sub-agent's turns are tracked like any turn (in flight until turn/completed) whether
  or not a Session follows it, and belong to the Session whose running turn above it spawned it
  (a half-closed Session ends after its sub-agents' turns too).
- Memory. A link is forgotten once the sub-agent has no follower, no remembered sub-agent of its
  own, and no turn running on it or on a thread above it (checked when a Session closes and when
  a turn completes on it or above it), so a long-lived broker does not grow.

Fast paths, each equivalent to the general route (tests/test_hub_routing.py feeds both the
same input): a chunk of a turn's notifications for one thread is read in C passes and queued
whole for each Session that follows it, never cut into lines (``_stream_chunk``); a small
answer that begins with its id, to a Session's request, is relayed with the client's id
spliced in instead of re-encoded (``_session_answer``). Any answer to a Session is queued
before what it changes is recorded.

Every client message comes in through ``receive`` (bytes as the client sent them), in the
order the client sent them: read by proxy/jsonrpc.py (a few C passes over its bytes, no object
per value, so a big message holds the loop briefly), then routed. Bad input
gets a JSON-RPC error on its Session; nothing a client sends reaches the app-server as it was
written, only as the envelope the broker re-encoded (``_send_line`` is the one door, and it
refuses a line with a newline inside). Messages the proxy relays keep their ids' and values'
JSON text exactly (see jsonrpc's envelopes). An exception out of ``route`` is a fault of the
broker's own: the front end ends the Session with ``EndReason.INTERNAL``.

The hub knows no transport: a Session ends with a reason (proxy/session.py), which each front
end maps to its own terms (service.py: gRPC statuses; jsonl.py: a last error line), and the
error new work gets while draining is the Session's own (``Session.draining_error``, set by
its front end: -32600 over gRPC, -32001 over JSONL)."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import msgspec
from orjson import loads as _orjson_loads

from proxy import jsonrpc
from proxy.jsonrpc import ClientMessage, Kind, Refusal, dumps, error_response, thread_id_of
from proxy.session import Ending, EndReason, Session

log = logging.getLogger("codex_broker.proxy")

# Kinds of requests the proxy sends to the app-server.
SESSION, CALL, PROBE, INTERNAL = "session", "call", "probe", "internal"
_TRACKED_NOTIFICATIONS = frozenset({"turn/started", "turn/completed"})  # they change what the hub tracks
# Routed off the hot path: turns begin and end, a thread/started can name its parent, and an
# item/started or item/completed can link sub-agents (only a collabAgentToolCall item leaves it).
_SLOW_NOTIFICATIONS = _TRACKED_NOTIFICATIONS | jsonrpc.LINEAGE_METHODS
_ITEM_NOTIFICATIONS = frozenset({"item/started", "item/completed"})


class _Params(msgspec.Struct, gc=False):  # gc=False: str fields only, no cycles; not tracked
    threadId: str | None = None


class _Note(msgspec.Struct, gc=False):
    """What the stream's fast path reads of a line: the rest is skipped (validated, not built).
    A line without a method or params object, or with any id (a request), fails to decode as
    one: the chunk is no stream chunk. Not tracked by the collector (nothing in it can hold a
    cycle), so a chunk's hundreds of them neither cost tracking nor set off collections."""
    method: str
    params: _Params
    id: msgspec.UnsetType = msgspec.UNSET


_NOTE = msgspec.json.Decoder(_Note)
_VALUE = msgspec.json.Decoder(msgspec.Raw)  # a value's own text: where it begins and ends
STREAM_CHUNK = 1024  # bytes in a chunk of several lines from which the stream's fast path is tried
_UNIFORM: dict[tuple[str, str], _Uniform] = {}  # see _uniform
_UNIFORM_MAX = 64  # pairs kept (a few per running turn: one per kind of delta); then forgotten at once


@dataclass(frozen=True, slots=True)
class _Uniform:
    """Decoders of notifications ``method`` of ``thread_id`` and nothing else: any other line,
    a _Note or not, fails to decode. Both are literals, matched where they lie: no string is
    built or hashed per line, and a uniform chunk (the usual run of one kind of delta) needs no
    pass over its notes in Python. ``lines`` reads a chunk's lines; ``bracketed`` reads them
    each wrapped in an array of its own, which must hold exactly one note (see _stream_chunk)."""
    lines: msgspec.json.Decoder[Any]
    bracketed: msgspec.json.Decoder[Any]


def _uniform(method: str, thread_id: str) -> _Uniform:
    found = _UNIFORM.get((method, thread_id))
    if found is None:
        if len(_UNIFORM) >= _UNIFORM_MAX:
            _UNIFORM.clear()
        literal = cast(Any, Literal)
        params = msgspec.defstruct("_ParamsOf", [("threadId", literal[thread_id])], gc=False)
        note = msgspec.defstruct("_NoteOf", [("method", literal[method]), ("params", params),
                                             ("id", msgspec.UnsetType, msgspec.UNSET)], gc=False)
        found = _UNIFORM[(method, thread_id)] = _Uniform(msgspec.json.Decoder(note),
                                                          msgspec.json.Decoder(list[tuple[note]]))  # type: ignore[valid-type]
    return found


def _read_run(body: bytes, method: str, thread_id: str) -> tuple[int, set[str]] | None:
    """(how many lines, which methods) of a chunk whose first line is a notification ``method``
    of ``thread_id``, when every line is exactly one notification of that thread and none of
    them changes what the hub tracks; else None. C passes only, Python per line only where the
    notes are not all alike (see Hub._stream_chunk)."""
    uniform = _uniform(method, thread_id)
    if b"[" not in body and b"]" not in body:
        # One pass. With no bracket anywhere in the chunk, each line put between brackets of
        # our own is an array of exactly what that line holds (nothing in it can open or close
        # one): that it decodes as one note each proves every line exactly one value (not
        # blank, not split, not two) while the notes are read.
        bracketed = b"[[" + body.replace(b"\n", b"],[") + b"]]"
        count = (len(bracketed) - len(body)) // 2 - 1  # each newline became two bytes longer
        try:
            if len(uniform.bracketed.decode(bracketed)) == count:
                return count, {method}
        except msgspec.MsgspecError:
            pass  # not all alike, or not exactly a value a line: as below
    try:
        values = _VALUE.decode_lines(body)
        # Each line must be exactly one value. The values put back together with one newline
        # between them give the chunk, and no value holds a newline of its own (one that runs
        # over a line's end, whitespace inside it): then each value is its line, no more, no
        # less (no line split, blank, holding two, padded).
        count = len(values)
        if b"\n".join(values) != body or len(body) - len(body.replace(b"\n", b"")) != count - 1:
            return None
        try:
            uniform.lines.decode_lines(body)
            return count, {method}
        except msgspec.ValidationError:  # not all alike: each note read, then checked here
            notes = _NOTE.decode_lines(body)
    except msgspec.MsgspecError:
        return None
    methods = {note.method for note in notes}
    if not methods.isdisjoint(_SLOW_NOTIFICATIONS) or {note.params.threadId for note in notes} != {thread_id}:
        return None
    return count, methods


def _plain_item(method: str, msg: dict[str, Any]) -> bool:
    """An item notification that cannot link a sub-agent (its item is no collab call)."""
    if method not in _ITEM_NOTIFICATIONS:
        return False
    params = msg.get("params")
    item = params.get("item") if type(params) is dict else None
    return type(item) is dict and item.get("type") != "collabAgentToolCall"
_RESPONSE_START = b'{"id":'  # how codex begins a response (the unary fast path's splice point)
STDIN_BUFFER_LIMIT = 64 << 20  # bytes queued for the app-server before requests are refused
# An app-server line this big is routed from its envelope (jsonrpc) rather than decoded whole;
# a client message this big is routed in a turn of the loop after the one that read it.
LARGE_LINE = 1 << 20
YIELD_SECONDS = 0.001
# The last notifications no Session followed, kept for a sub-agent linked just after them.
ORPHAN_MESSAGES = 256
ORPHAN_BYTES = 1 << 20
# Request methods named in metrics labels; any other is "other", so clients cannot grow the label set.
METRIC_METHODS = frozenset({
    "initialize", "thread/start", "thread/resume", "thread/fork", "thread/read", "thread/list",
    "thread/loaded/list", "thread/archive", "thread/unarchive", "thread/name/set", "thread/rollback",
    "thread/compact/start", "turn/start", "turn/interrupt", "review/start", "model/list", "account/read",
    "config/read", "command/exec",
})
# Outcomes of a client request: answered with a result, answered with an error, refused by the
# broker (draining, stopping, overloaded, app-server gone), failed by the app-server's exit.
OK, ERROR, REFUSED, FAILED = "ok", "error", "refused", "failed"


def metric_method(method: str) -> str:
    return method if method in METRIC_METHODS else "other"


@dataclass(eq=False)
class Counts:
    """What the hub has done, for proxy/metrics.py to read when scraped: plain ints and
    Counters, bumped where things happen (the hot path adds once per chunk of lines)."""
    sessions_opened: collections.Counter[str] = field(default_factory=collections.Counter)  # by transport
    slow_drops: collections.Counter[str] = field(default_factory=collections.Counter)  # by transport
    checks: collections.Counter[str] = field(default_factory=collections.Counter)  # connect-and-close, by transport
    requests: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter)  # (session | call, method label, outcome)
    lines_from_app_server: int = 0
    bytes_from_app_server: int = 0
    messages_from_clients: int = 0
    bytes_from_clients: int = 0


# What a result hands its requester: thread ids to follow, the review thread, the turn id.
Facts = tuple[list[str], str | None, str | None]
NO_FACTS: Facts = ([], None, None)


def _result_facts(result: Any) -> Facts:
    """``jsonrpc.result_ids`` of a decoded result."""
    if not isinstance(result, dict):
        return NO_FACTS
    turn = result.get("turn")
    review = result.get("reviewThreadId")
    return (jsonrpc.thread_ids_in_result(result), review if isinstance(review, str) else None,
            turn.get("id") if isinstance(turn, dict) and isinstance(turn.get("id"), str) else None)


class AppServerGone(Exception):
    """The app-server has exited: no request can be sent."""


@dataclass(eq=False)
class Pending:
    kind: str
    method: str
    sent_at: float  # monotonic
    session: Session | None = None
    client_id: msgspec.Raw | None = None  # the client's id, as it wrote it
    thread_id: str | None = None
    future: asyncio.Future[dict[str, Any]] | None = None
    counted: bool = True  # a client's request, counted in the metrics (not the broker's own initialize)


@dataclass(eq=False)
class Turn:
    thread_id: str
    turn_id: str
    started_at: float  # unix time
    owner: Session | None = None


@dataclass(eq=False)
class ServerRequest:
    app_id: Any  # the app-server's own id, as it wrote it (msgspec.Raw)
    method: str
    targets: set[Session] = field(default_factory=set)


class Hub:
    def __init__(self, *, send: Callable[[bytes], None], stdin_backlog: Callable[[], int],
                 session_buffer_bytes: int, on_change: Callable[[], None]):
        self._send = send
        self._stdin_backlog = stdin_backlog
        self._session_buffer_bytes = session_buffer_bytes
        self._on_change = on_change  # in-flight work or Sessions changed
        self._ids = itertools.count(1)
        self._server_ids = itertools.count(1)
        self.sessions: dict[str, Session] = {}
        self.pending: dict[int, Pending] = {}
        self.threads: dict[str, set[Session]] = {}  # a thread's followers (its ancestors' too)
        self.parents: dict[str, str] = {}  # sub-agent thread -> the thread that spawned it
        self.children: dict[str, set[str]] = {}  # thread -> the sub-agents it spawned
        self._orphans: collections.deque[tuple[str, str, bytes]] = collections.deque()  # thread, method, line
        self._orphan_bytes = 0
        self.turns: dict[tuple[str, str], Turn] = {}
        self.server_requests: dict[int, ServerRequest] = {}
        self._pending_work = 0
        self._big_message = asyncio.Lock()
        self.init_result: Any = None
        self.draining = False
        self.stopping = False  # the broker decided to stop: nothing new goes to the app-server
        self.gone: str | None = None  # why the app-server is gone, once it is
        self.last_response = 0.0  # monotonic time of the last response from the app-server
        self.on_probe_response: Callable[[Pending], None] = lambda pending: None
        self.counts = Counts()
        self.on_turn_end: Callable[[float], None] = lambda seconds: None  # a turn's duration, once it ends

    # -- accounting ----------------------------------------------------------------------
    @property
    def pending_work(self) -> int:
        """Requests from clients (Sessions and Calls) the app-server has not answered."""
        return self._pending_work

    @property
    def in_flight(self) -> int:
        """Pending client requests + running turns + turns announced by a successful start
        request but not begun yet (thread/compact/start answers without a turn id)."""
        announced = sum(sum(s.starting.values()) for s in self.sessions.values() if s.starting)
        return self.pending_work + len(self.turns) + announced

    def oldest_pending(self) -> float | None:
        """Monotonic send time of the oldest request the app-server has not answered."""
        for pending in self.pending.values():
            return pending.sent_at
        return None

    # -- sending to the app-server -------------------------------------------------------
    def _send_line(self, line: bytes) -> None:
        """The one door to the app-server's stdin: one message the broker encoded, one line."""
        if b"\n" in line:
            raise AssertionError("refusing to write a line with a newline inside to the app-server")
        self._send(line)

    def request(self, kind: str, method: str, params: Any, **fields: Any) -> int:
        """Sends a request under a fresh proxy id and records it; returns the id. ``params``:
        decoded values or JSON text (msgspec.Raw)."""
        msg = {"id": 0, "method": method, "params": params if params is not None else {}}
        return self._send_request(msg, Pending(kind, method, time.monotonic(), **fields))

    def _send_request(self, msg: dict[str, Any], pending: Pending) -> int:
        proxy_id = self._send_new(msg)
        self._record(proxy_id, pending)
        return proxy_id

    def _send_new(self, msg: dict[str, Any]) -> int:
        """Writes a request under a fresh proxy id (recorded by the caller, after: the write
        comes first, the app-server cannot answer before the loop runs again)."""
        if self.gone is not None:
            raise AppServerGone(self.gone)
        proxy_id = next(self._ids)
        msg["id"] = proxy_id
        self._send_line(jsonrpc.encode(msg))
        return proxy_id

    def _record(self, proxy_id: int, pending: Pending) -> None:
        self.pending[proxy_id] = pending
        if pending.kind in (SESSION, CALL):
            self._pending_work += 1

    def overloaded(self) -> bool:
        return self._stdin_backlog() > STDIN_BUFFER_LIMIT

    async def call(self, method: str, params: Any) -> dict[str, Any]:
        """One request outside any Session; returns the app-server's response message (its
        members as JSON text, msgspec.Raw) or the proxy's own error (decoded values)."""
        if method == "initialize":
            self._count(CALL, method, OK)
            return {"id": None, "result": self.init_result}
        if self.stopping or (self.draining and method in jsonrpc.NEW_WORK_METHODS):
            self._count(CALL, method, REFUSED)
            return {"id": None, "error": jsonrpc.DRAINING_ERROR}
        if self.overloaded():
            self._count(CALL, method, REFUSED)
            return {"id": None, "error": jsonrpc.OVERLOADED_ERROR}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            self.request(CALL, method, params, future=future, thread_id=thread_id_of(params))
        except AppServerGone as exc:
            self._count(CALL, method, REFUSED)
            return {"id": None, "error": jsonrpc.error(jsonrpc.APP_SERVER_EXITED, str(exc))}
        self._on_change()
        return await future

    # -- Sessions ------------------------------------------------------------------------
    def open_session(self, *, transport: str = "grpc",
                     draining_error: dict[str, Any] = jsonrpc.DRAINING_ERROR, counted: bool = True) -> Session:
        """A new Session; ``transport`` names its front end, ``draining_error`` is what its new
        work gets while the broker drains (each front end has its own code). Not ``counted``: a
        connection that may only be a connect-and-close check; ``count_session`` counts it as a
        Session once it sends something, ``close_session`` as a check if it never does."""
        session = Session(uuid.uuid4().hex[:12], self._session_buffer_bytes, self._overflow,
                          transport=transport, draining_error=draining_error, counted=counted)
        self.sessions[session.id] = session
        if counted:
            self.counts.sessions_opened[transport] += 1
        self._on_change()
        return session

    def count_session(self, session: Session) -> None:
        """A connection opened uncounted has shown it is a Session."""
        if not session.counted:
            session.counted = True
            self.counts.sessions_opened[session.transport] += 1

    def _count(self, via: str, method: str, outcome: str) -> None:
        self.counts.requests[(via, metric_method(method), outcome)] += 1

    def _overflow(self, session: Session) -> None:
        self.counts.slow_drops[session.transport] += 1
        log.warning("session %s dropped: outgoing buffer over %d bytes (client not reading)",
                    session.id, session.limit_bytes)
        session.end(Ending(EndReason.SLOW_CLIENT,
                           f"Server overloaded; retry later. (this Session fell more than "
                           f"{session.limit_bytes} bytes behind and was dropped)", flush=False))
        self.close_session(session)
        if session.handler is not None:
            session.handler.cancel()

    def close_session(self, session: Session) -> None:
        """The Session is gone: drop its subscriptions, answer its server requests for it."""
        if self.sessions.pop(session.id, None) is None:
            return
        if not session.counted:
            self.counts.checks[session.transport] += 1
        session.end(Ending())
        unfollowed = []
        for thread_id in session.threads:
            subscribers = self.threads.get(thread_id)
            if subscribers is not None:
                subscribers.discard(session)
                if not subscribers:
                    del self.threads[thread_id]
                    unfollowed.append(thread_id)
        for thread_id in unfollowed:
            self._release(thread_id)
        self._abandon_server_requests(session)
        for turn in self.turns.values():
            if turn.owner is session:
                turn.owner = None
        self._on_change()

    def half_close(self, session: Session) -> None:
        """The client is done writing: it stops counting for server requests and its Session
        ends once its requests are answered and the turns it started have completed."""
        session.half_closed = True
        self._abandon_server_requests(session)
        self._maybe_finish(session)

    def _maybe_finish(self, session: Session) -> None:
        if session.half_closed and session.finished_work and session.open:
            session.end(Ending())

    def _abandon_server_requests(self, session: Session) -> None:
        for local_id in list(session.server_requests):
            request = self.server_requests.get(local_id)
            if request is None:
                continue
            request.targets.discard(session)
            if not request.targets:
                del self.server_requests[local_id]
                self._answer_app_server(request.app_id, jsonrpc.NO_CLIENT_ERROR)
        session.server_requests.clear()

    def _subscribe(self, session: Session, thread_id: str) -> None:
        """The Session follows the thread and its sub-agents (a Session that follows a thread
        already follows all its sub-agents: subscriptions only ever propagate down)."""
        if not session.open or thread_id in session.threads:
            return
        stack = [thread_id]
        while stack:
            thread_id = stack.pop()
            if thread_id not in session.threads:
                session.threads.add(thread_id)
                self.threads.setdefault(thread_id, set()).add(session)
                stack.extend(self.children.get(thread_id, ()))

    # -- sub-agents ----------------------------------------------------------------------
    def _adopt(self, child: str, parent: str) -> None:
        """``child`` is a sub-agent of ``parent``: its messages go to the parent's followers.
        The first link wins; one that would make a thread its own ancestor is refused."""
        if child in self.parents:
            return
        ancestor: str | None = parent
        while ancestor is not None:
            if ancestor == child:
                log.warning("sub-agent link %s -> %s refused: it would close a cycle", child, parent)
                return
            ancestor = self.parents.get(ancestor)
        self.parents[child] = parent
        self.children.setdefault(parent, set()).add(child)
        for session in list(self.threads.get(parent, ())):
            self._subscribe(session, child)
        self._deliver_orphans(child)
        owner = self._owner_above(child)
        if owner is not None:  # a turn the sub-agent began before the link
            for key in [key for key in self.turns if key[0] == child]:
                self._begin_turn(child, key[1], owner)

    def _owner_above(self, thread_id: str) -> Session | None:
        """The Session whose running turn, on a thread above this sub-agent, spawned it: it
        owns the sub-agent's turns too (its half-close waits for them)."""
        ancestor = self.parents.get(thread_id)
        while ancestor is not None:
            for (thread, _), turn in self.turns.items():
                if thread == ancestor and turn.owner is not None and turn.owner.open:
                    return turn.owner
            ancestor = self.parents.get(ancestor)
        return None

    def _keep_orphan(self, thread_id: str, method: str, line: bytes) -> None:
        """A notification no Session follows, kept in the bounded ring of the last ones."""
        if len(line) > ORPHAN_BYTES:
            return
        self._orphans.append((thread_id, method, line))
        self._orphan_bytes += len(line)
        while len(self._orphans) > ORPHAN_MESSAGES or self._orphan_bytes > ORPHAN_BYTES:
            self._orphan_bytes -= len(self._orphans.popleft()[2])

    def _deliver_orphans(self, thread_id: str) -> None:
        """The kept notifications of a thread just linked go to its followers, in order."""
        if not any(entry[0] == thread_id for entry in self._orphans):
            return
        kept: collections.deque[tuple[str, str, bytes]] = collections.deque()
        targets = list(self.threads.get(thread_id, ()))
        for entry in self._orphans:
            if entry[0] != thread_id:
                kept.append(entry)
                continue
            self._orphan_bytes -= len(entry[2])
            for session in targets:
                if entry[1] not in session.opt_out:
                    session.push(entry[2])
        self._orphans = kept

    def _running(self, thread_id: str) -> bool:
        """Whether a turn runs on the thread or on a thread above it (a Session that resumes
        the root mid-turn still gets the sub-agents that turn spawned)."""
        running = {key[0] for key in self.turns}
        ancestor: str | None = thread_id
        while ancestor is not None:
            if ancestor in running:
                return True
            ancestor = self.parents.get(ancestor)
        return False

    def _release(self, thread_id: str) -> None:
        """Forgets a sub-agent that no Session follows, that has no remembered sub-agent and
        on which, or above which, no turn runs; then its parent by the same rule, and so on up."""
        while (thread_id in self.parents and thread_id not in self.threads
               and thread_id not in self.children and not self._running(thread_id)):
            parent = self.parents.pop(thread_id)
            siblings = self.children[parent]
            siblings.discard(thread_id)
            if siblings:
                return
            del self.children[parent]
            thread_id = parent

    def _release_tree(self, thread_id: str) -> None:
        """``_release`` for a thread's sub-agents, deepest first, then for the thread."""
        order, stack = [], [thread_id]
        while stack:
            current = stack.pop()
            order.append(current)
            stack.extend(self.children.get(current, ()))
        for current in reversed(order):
            self._release(current)

    # -- from a client -------------------------------------------------------------------
    async def receive(self, session: Session, data: bytes) -> None:
        """Decode-and-route one client message, bytes as the client sent them (the front end
        awaits each before reading the next: a Session's order is kept). Bad input gets its
        JSON-RPC error on the Session; an exception out of here is the broker's own fault. A
        big message is read, then routed in a later turn of the loop, one big message at a time,
        so that what arrived meanwhile (health checks, other Sessions' messages) is served in
        between."""
        if len(data) < LARGE_LINE:
            self.route_line(session, data)
            return
        counts = self.counts
        counts.messages_from_clients += 1
        counts.bytes_from_clients += len(data)
        async with self._big_message:  # one at a time: two Sessions' big messages do not stack up
            message = jsonrpc.read_client_message(data)
            await asyncio.sleep(YIELD_SECONDS)  # a timer: the loop polls for I/O before it fires
            self.route(session, message)

    def route_line(self, session: Session, data: bytes) -> None:
        """A small client message (under LARGE_LINE): counted, read and routed at once."""
        counts = self.counts
        counts.messages_from_clients += 1
        counts.bytes_from_clients += len(data)
        self.route(session, jsonrpc.read_client_message(data))

    def refuse(self, session: Session, refusal: Refusal) -> None:
        """A message the front end could not even take apart: its error, with a null id."""
        if session.open:
            session.push(error_response(None, refusal.error))

    def route(self, session: Session, message: ClientMessage | Refusal) -> None:
        """Routes one client message, read (jsonrpc.read). A Session that has ended routes
        nothing more: what it sends could not be answered."""
        if not session.open:
            return
        if isinstance(message, Refusal):
            self.refuse(session, message)
        elif message.kind is Kind.REQUEST:
            self._client_request(session, message)
        elif message.kind is Kind.NOTIFICATION:
            self._client_notification(message)
        elif message.kind is Kind.ANSWER:
            self._client_answer(session, message)
        else:
            self._settle_if_asked(session, message)
            session.push(error_response(message.id, jsonrpc.error(jsonrpc.INVALID_REQUEST, message.problem or "")))

    def _client_notification(self, message: ClientMessage) -> None:
        if message.method == "initialized":
            return  # the broker initialized the app-server once, at start
        if self.gone is None:
            self._send_line(jsonrpc.encode(message.members))

    def _client_request(self, session: Session, message: ClientMessage) -> None:
        method = message.method
        assert method is not None and message.id is not None
        client_id = message.id
        if method == "initialize":
            self._initialize(session, client_id, message.members.get("params"))
            return
        thread_id = message.thread_id
        if thread_id is not None:
            self._subscribe(session, thread_id)  # even if the request fails
        if self.stopping or (self.draining and method in jsonrpc.NEW_WORK_METHODS):
            # Once stopping, a request would reach the app-server and its response be lost
            # with the Session: refuse it, so that a retry is safe.
            self._count(SESSION, method, REFUSED)
            session.push(error_response(client_id, session.draining_error))
            return
        if self.overloaded():
            self._count(SESSION, method, REFUSED)
            session.push(error_response(client_id, jsonrpc.OVERLOADED_ERROR))
            return
        sent_at = time.monotonic()
        try:
            proxy_id = self._send_new(dict[str, Any](message.members))
        except AppServerGone as exc:
            self._count(SESSION, method, REFUSED)
            session.push(error_response(client_id, jsonrpc.error(jsonrpc.APP_SERVER_EXITED, str(exc))))
            return
        self._record(proxy_id, Pending(SESSION, method, sent_at, session=session, client_id=client_id,
                                       thread_id=thread_id))
        session.pending.add(proxy_id)
        if method in jsonrpc.TURN_STARTING_METHODS and thread_id is not None:
            session.starting[thread_id] += 1
        self._on_change()

    def _initialize(self, session: Session, client_id: msgspec.Raw, params_raw: msgspec.Raw | None) -> None:
        if session.initialized:
            self._count(SESSION, "initialize", ERROR)
            session.push(error_response(client_id, jsonrpc.ALREADY_INITIALIZED_ERROR))
            return
        self._count(SESSION, "initialize", OK)
        session.initialized = True
        params = jsonrpc.loads_for_routing(bytes(params_raw)) if params_raw else None
        if isinstance(params, dict):
            info = params.get("clientInfo")
            if isinstance(info, dict) and isinstance(info.get("name"), str):
                session.client_name = info["name"]
            caps = params.get("capabilities")
            if isinstance(caps, dict) and isinstance(caps.get("optOutNotificationMethods"), list):
                session.opt_out = frozenset(m for m in caps["optOutNotificationMethods"] if isinstance(m, str))
        session.push(dumps({"id": client_id, "result": self.init_result}))

    def _asked(self, session: Session, message: ClientMessage) -> ServerRequest | None:
        """The server request this message answers, if it was sent to this Session."""
        if message.id is None:
            return None
        local_id = jsonrpc.value(message.id)
        request = self.server_requests.get(local_id) if type(local_id) is int else None
        return request if request is not None and session in request.targets else None

    def _settle(self, local_id: int, request: ServerRequest) -> None:
        del self.server_requests[local_id]
        for target in request.targets:
            target.server_requests.discard(local_id)

    def _client_answer(self, session: Session, message: ClientMessage) -> None:
        """The first answer to a server request settles it: relayed under the app-server's id
        when it is a valid JSON-RPC answer the broker can encode as one line, else the
        app-server hears a decline (-32000), so that nothing waits for an answer that will
        never be readable."""
        request = self._asked(session, message)
        if request is None:
            log.info("session %s: late or unknown answer to server request %s dropped", session.id,
                     bytes(message.id or b"null")[:40].decode())
            return
        why = message.problem
        line = b""
        if why is None:
            members: dict[str, Any] = dict(message.members)
            members["id"] = request.app_id
            try:
                line = jsonrpc.encode(members)
            except (msgspec.MsgspecError, TypeError, ValueError) as exc:
                why = f"it could not be encoded ({exc})"
            else:
                why = "it spans lines" if b"\n" in line else None
        if why is not None:
            self._decline(session, message, request, why)
            return
        self._settle(jsonrpc.value(message.id), request)
        if self.gone is None:
            self._send_line(line)

    def _settle_if_asked(self, session: Session, message: ClientMessage) -> None:
        """An invalid message under the id of a server request it was asked (``{"id": 3}``):
        that request is settled with a decline, the client hears -32600."""
        request = self._asked(session, message)
        if request is not None and "method" not in message.members:
            self._decline(session, message, request, "it has no result and no error")

    def _decline(self, session: Session, message: ClientMessage, request: ServerRequest, why: str) -> None:
        local_id = jsonrpc.value(message.id)
        self._settle(local_id, request)
        log.warning("session %s: answer to server request %s (%s) not relayed: %s; declined", session.id,
                    local_id, request.method, why)
        self._answer_app_server(request.app_id, jsonrpc.error(
            jsonrpc.NO_CLIENT_ANSWERED, f"the client's answer could not be relayed: {why}"))

    def _answer_app_server(self, app_id: Any, error: dict[str, Any]) -> None:
        if self.gone is None:
            self._send_line(error_response(app_id, error))

    # -- from the app-server -------------------------------------------------------------
    def from_app_server_chunk(self, body: bytes) -> None:
        """Complete lines of the app-server's stdout, in order, joined by newlines (blank ones
        skipped): as proxy/appserver.py's LineSplitter hands them over."""
        if b"\n" not in body:
            self.from_app_server_lines([body])
        elif len(body) < LARGE_LINE:
            if len(body) < STREAM_CHUNK or not self._stream_chunk(body):
                self.from_app_server_lines(body.split(b"\n"))
        else:  # it may hold a line that big (one that ran over many reads): that one goes alone
            run: list[bytes] = []
            for line in body.split(b"\n"):
                if len(line) < LARGE_LINE:
                    run.append(line)
                    continue
                if run:
                    self.from_app_server_lines(run)
                    run = []
                self.from_app_server_lines([line])
            if run:
                self.from_app_server_lines(run)

    def from_app_server_lines(self, lines: list[bytes]) -> None:
        """Lines of the app-server's stdout, in order (blank ones skipped). The hot path: one
        turn streams tens of thousands of notifications, so the common case, a notification
        naming a thread that one Session follows, is routed here inline, and consecutive ones
        for the same Session are queued together; everything else goes through ``_route``
        after those are queued, so each Session still gets its messages in order."""
        counts = self.counts
        counts.lines_from_app_server += len(lines)
        counts.bytes_from_app_server += sum(map(len, lines))
        if len(lines) == 1:
            line = lines[0]
            if len(line) >= LARGE_LINE:  # a line only comes alone that big (from_app_server_chunk)
                self._route_envelope(line)
                return
            if line.startswith(_RESPONSE_START) and line.endswith(b"}") and self._session_answer(line):
                return
        loads = _orjson_loads
        threads = self.threads
        run_session: Session | None = None
        run: list[bytes] = []
        for line in lines:
            try:
                msg = loads(line)
            except ValueError:
                if line.strip():
                    if run:
                        run_session.push_many(run)  # type: ignore[union-attr]
                        run = []
                    self.from_app_server(line)  # tells why, or decodes what orjson refuses
                continue
            if type(msg) is dict:
                method = msg.get("method")
                if type(method) is str and "id" not in msg and (method not in _SLOW_NOTIFICATIONS
                                                                or _plain_item(method, msg)):
                    params = msg.get("params")
                    thread_id = params.get("threadId") if type(params) is dict else None
                    if type(thread_id) is str and thread_id:
                        subscribers = threads.get(thread_id)
                        if subscribers is not None and len(subscribers) == 1:
                            (session,) = subscribers
                            if method not in session.opt_out:
                                if session is not run_session:
                                    if run:
                                        run_session.push_many(run)  # type: ignore[union-attr]
                                    run_session, run = session, []
                                # passed on as the app-server wrote it (decoding checked its UTF-8)
                                run.append(line)
                            continue
            if run:
                run_session.push_many(run)  # type: ignore[union-attr]
                run = []
            self._route(line, msg)
        if run:
            run_session.push_many(run)  # type: ignore[union-attr]

    def _stream_chunk(self, body: bytes) -> bool:
        """The stream's fast path: a chunk of lines (``body``, joined by newlines) that are all
        notifications of one thread, none of which changes what the hub tracks (the usual
        chunk of a turn's deltas), is queued whole for each Session that follows the thread and
        opted out of none of its methods, read in C passes: its first line, for the thread
        and method; its UTF-8 checked at once; its values' extents, which must be its lines
        exactly; then only method, params.threadId and id of each, matched against the first
        line's as literals (``_read_run``; in one pass where the chunk holds no bracket), or,
        where they are not all alike, built and compared here. False, with nothing done, for
        any other chunk (a line that is not such a notification, not exactly one JSON value,
        blank; more than one thread; a thread nobody follows; a follower that opted out of
        some of its methods but not all): the line-by-line route takes it."""
        try:  # the first line names the one thread and, usually, the one method of them all
            first = _NOTE.decode(body[:body.find(b"\n")])
        except msgspec.MsgspecError:
            return False
        method, thread_id = first.method, first.params.threadId
        if not thread_id or method in _SLOW_NOTIFICATIONS:
            return False
        subscribers = self.threads.get(thread_id)
        if not subscribers:
            return False  # nobody follows it (kept for a sub-agent linked later)
        if not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError:
                return False
        run = _read_run(body, method, thread_id)
        if run is None:
            return False
        count, methods = run
        receivers = []
        for session in subscribers:
            opt_out = session.opt_out
            if not opt_out or opt_out.isdisjoint(methods):
                receivers.append(session)
            elif not methods <= opt_out:
                return False  # it takes some of the chunk's lines and not others
        counts = self.counts
        counts.lines_from_app_server += count
        counts.bytes_from_app_server += len(body) - (count - 1)
        for session in receivers:
            session.push_lines(body)
        return True

    def _session_answer(self, line: bytes) -> bool:
        """The unary fast path: a small response that begins with its id (``{"id":N,``, as
        codex writes them) to a Session's request is relayed as the
        app-server wrote it but for the id, the client's own spliced in, and written before
        anything is recorded (``_response``, as for any answer). False, with nothing done,
        for anything else: ``_route`` takes it."""
        comma = line.find(b",", 6, 28)
        digits = line[6:comma]
        if comma < 0 or not digits.isdigit():
            return False
        proxy_id = int(digits)
        pending = self.pending.get(proxy_id)
        if pending is None or pending.kind != SESSION:
            return False
        try:
            msg = _orjson_loads(line)
        except ValueError:
            return False
        if (type(msg) is not dict or msg.get("id") != proxy_id or "method" in msg
                or ("result" in msg) == ("error" in msg)):
            return False
        assert pending.client_id is not None
        self._response(proxy_id, msg, lambda: _result_facts(msg.get("result")),
                       b"".join((_RESPONSE_START, pending.client_id, line[comma:])))
        return True

    def from_app_server(self, line: bytes) -> None:
        """A line orjson did not decode: routed from its envelope, or skipped as bad."""
        self._route_envelope(line)

    def _route(self, line: bytes, msg: Any) -> None:
        """A line orjson decoded (``msg``: its numbers may be rounded; it is read for routing
        only, what is relayed is the line's own text)."""
        if not isinstance(msg, dict):
            self._bad_line(line, "not a JSON object")
            return
        method = msg.get("method")
        params = msg.get("params")
        if isinstance(method, str):
            if "id" in msg:
                self._server_request(line, None, method, thread_id_of(params))
            else:
                turn = params.get("turn") if method in _TRACKED_NOTIFICATIONS and type(params) is dict else None
                turn_id = turn.get("id") if isinstance(turn, dict) else None
                spawned = jsonrpc.spawned_threads(method, params) if method in jsonrpc.LINEAGE_METHODS else []
                self._notification(method, thread_id_of(params), turn_id if isinstance(turn_id, str) else None, line,
                                   spawned)
        elif "id" in msg and ("result" in msg or "error" in msg):
            self._response_line(line, None, msg["id"], lambda: _result_facts(msg.get("result")))
        else:
            self._bad_line(line, "neither a request, a response nor a notification")

    def _route_envelope(self, line: bytes) -> None:
        """A big line, or one orjson refused: only its routing fields are decoded (C passes
        over the text, no object per value), so a many-MB result costs the loop little."""
        try:
            members = jsonrpc.envelope(line, check_depth=False)
        except jsonrpc.InvalidMessage:
            self._bad_line(line, "not a JSON object")
            return
        except jsonrpc.DecodeError as exc:
            if line.strip():
                self._bad_line(line, f"not JSON ({exc})")
            return
        method = jsonrpc.text(members.get("method"))
        if method is not None:
            thread_id, turn_id = jsonrpc.params_thread_and_turn(members.get("params"))
            if "id" in members:
                self._server_request(line, members, method, thread_id)
            else:
                self._notification(method, thread_id, turn_id, line,
                                   jsonrpc.spawned_threads_raw(method, members.get("params")))
        elif "id" in members and ("result" in members or "error" in members):
            raw_id = members["id"]
            proxy_id = jsonrpc.value(raw_id) if jsonrpc.request_id(raw_id) is not None else None
            result = members.get("result")
            self._response_line(line, members, proxy_id, lambda: jsonrpc.result_ids(result))
        else:
            self._bad_line(line, "neither a request, a response nor a notification")

    def _bad_line(self, line: bytes, why: str) -> None:
        preview = line[:200].decode("utf-8", "replace")
        log.warning("app-server line skipped (%d bytes): %s: %s", len(line), why, preview)
        if len(line) >= LARGE_LINE:
            return
        # If it still names a request we sent, its requester gets an error instead of silence.
        try:
            salvaged = jsonrpc.loads_lenient(line.decode("utf-8", "replace"))
        except jsonrpc.DecodeError:
            return
        if isinstance(salvaged, dict) and "method" not in salvaged and isinstance(salvaged.get("id"), int):
            error = jsonrpc.error(jsonrpc.INTERNAL_ERROR, f"the app-server sent an invalid response: {why}")
            self._response(salvaged["id"], {"id": salvaged["id"], "error": error}, lambda: NO_FACTS)

    def _response_line(self, line: bytes, members: jsonrpc.Members | None, proxy_id: Any,
                       facts: Callable[[], Facts]) -> None:
        if members is None:
            try:
                members = jsonrpc.envelope(line, check_depth=False)
            except ValueError as exc:
                self._bad_line(line, f"not relayable ({exc})")
                return
        self._response(proxy_id, members, facts)

    def _response(self, proxy_id: Any, msg: dict[str, Any], facts: Callable[[], Facts],
                  relayed: bytes | None = None) -> None:
        """A response to a request of the proxy's: ``msg`` its members (JSON text, or the
        proxy's own decoded error), ``facts`` what its result hands over, read only when the
        requester needs it (a big result costs a pass); ``relayed``: what a Session gets, when
        the caller made it already (else it is encoded from ``msg``)."""
        self.last_response = time.monotonic()
        pending = self.pending.pop(proxy_id, None) if type(proxy_id) is int else None
        if pending is None:
            log.warning("app-server answered an unknown request id %r", proxy_id)
            return
        if pending.kind in (SESSION, CALL):
            self._pending_work -= 1
            if pending.counted:
                self._count(pending.kind, pending.method, ERROR if "error" in msg else OK)
        if pending.kind == PROBE:
            self.on_probe_response(pending)
        elif pending.kind == CALL:
            assert pending.future is not None
            if not pending.future.done():
                pending.future.set_result(msg)
            if "result" in msg and pending.method in jsonrpc.TURN_STARTING_METHODS:
                self._note_turn_start(pending, facts(), None)
        elif pending.kind == SESSION:
            self._session_response(pending, proxy_id, msg, facts, relayed)
        self._on_change()

    def _session_response(self, pending: Pending, proxy_id: int, msg: dict[str, Any],
                          facts: Callable[[], Facts], relayed: bytes | None) -> None:
        """Its answer goes out first (the JSONL front end writes it at once), then what it
        changes is recorded: nothing recorded here affects that answer."""
        session = pending.session
        assert session is not None
        if session.open:
            if relayed is None:
                members = dict(msg)
                members["id"] = pending.client_id
                relayed = jsonrpc.encode(members)
            session.push(relayed)
        session.pending.discard(proxy_id)
        if "error" in msg and pending.method in jsonrpc.TURN_STARTING_METHODS and pending.thread_id:
            self._unannounce(session, pending.thread_id)
        if "result" in msg:
            handed = facts()
            for thread_id in handed[0]:
                self._subscribe(session, thread_id)
            self._note_turn_start(pending, handed, session)
        self._maybe_finish(session)

    def _unannounce(self, session: Session, thread_id: str) -> None:
        session.starting[thread_id] -= 1
        if session.starting[thread_id] <= 0:
            del session.starting[thread_id]

    def _note_turn_start(self, pending: Pending, facts: Facts, owner: Session | None) -> None:
        """A successful turn-starting response with a turn id begins that turn."""
        _, review_thread, turn_id = facts
        if pending.method not in jsonrpc.TURN_STARTING_METHODS or turn_id is None:
            return  # no turn id (thread/compact/start): the turn/started notification tells
        thread_id = review_thread if review_thread is not None else pending.thread_id
        if thread_id is None:
            return
        if owner is not None and pending.thread_id is not None:
            self._unannounce(owner, pending.thread_id)
        self._begin_turn(thread_id, turn_id, owner)

    def _begin_turn(self, thread_id: str, turn_id: str, owner: Session | None) -> None:
        key = (thread_id, turn_id)
        turn = self.turns.get(key)
        if turn is None:
            turn = self.turns[key] = Turn(thread_id, turn_id, time.time())
        if turn.owner is None and owner is not None and owner.open:
            turn.owner = owner
            owner.turns.add(key)

    def _end_turn(self, thread_id: str, turn_id: str) -> None:
        turn = self.turns.pop((thread_id, turn_id), None)
        if turn is not None:
            self.on_turn_end(max(time.time() - turn.started_at, 0.0))
        if turn is not None and turn.owner is not None:
            turn.owner.turns.discard((thread_id, turn_id))
            self._maybe_finish(turn.owner)
        self._on_change()

    def _notification(self, method: str, thread_id: str | None, turn_id: str | None, line: bytes,
                      spawned: list[jsonrpc.Link]) -> None:
        """``spawned``: the sub-agent links the notification names (jsonrpc.spawned_threads),
        made before it is delivered; a thread/started that names its parent goes to the
        sub-agent's followers, that is its parent's."""
        for child, parent, claimed in spawned:
            if claimed or not self.threads.get(child):  # never another client's thread
                self._adopt(child, parent)
        if spawned and method == "thread/started":
            thread_id = spawned[0][0]
        text = line  # passed on as the app-server wrote it (decoding for routing checked its UTF-8)
        targets: Iterable[Session] = self.sessions.values() if thread_id is None else self.threads.get(thread_id, ())
        if not targets and thread_id is not None and thread_id not in self.parents:
            self._keep_orphan(thread_id, method, line)
        for session in list(targets):
            if method not in session.opt_out:
                session.push(text)
        # After delivery: a turn/completed may end a half-closed Session, which must get it first.
        if (method == "turn/started" or method == "turn/completed") and thread_id is not None and turn_id:
            self._track_turn(method, thread_id, turn_id)

    def _track_turn(self, method: str, thread_id: str, turn_id: str) -> None:
        if method == "turn/completed":
            self._end_turn(thread_id, turn_id)
            self._release_tree(thread_id)
            return
        owner = None
        if (thread_id, turn_id) not in self.turns:
            for session in self.threads.get(thread_id, ()):
                if session.starting.get(thread_id):
                    owner = session
                    self._unannounce(session, thread_id)
                    break
        if owner is None and thread_id in self.parents:
            owner = self._owner_above(thread_id)
        self._begin_turn(thread_id, turn_id, owner)
        self._on_change()

    def _server_request(self, line: bytes, members: jsonrpc.Members | None, method: str,
                        thread_id: str | None) -> None:
        if members is None:
            try:
                members = jsonrpc.envelope(line, check_depth=False)
            except ValueError as exc:
                self._bad_line(line, f"not relayable ({exc})")
                return
        app_id = members["id"]
        pool = self.sessions.values() if thread_id is None else self.threads.get(thread_id, ())
        targets = {s for s in pool if s.open and not s.half_closed}
        if not targets:
            log.info("server request %s (id %s) has no client to answer it; declined", method,
                     bytes(app_id)[:40].decode())
            self._answer_app_server(app_id, jsonrpc.NO_CLIENT_ERROR)
            return
        local_id = next(self._server_ids)
        self.server_requests[local_id] = ServerRequest(app_id, method, targets)
        relayed: dict[str, Any] = dict(members)
        relayed["id"] = local_id
        text = jsonrpc.encode(relayed)
        for session in list(targets):
            session.server_requests.add(local_id)
            session.push(text)

    # -- app-server death ----------------------------------------------------------------
    def app_server_gone(self, why: str) -> None:
        """Fails every pending request at once with ``why`` and ends every Session."""
        if self.gone is not None:
            return
        self.gone = why
        error = jsonrpc.error(jsonrpc.APP_SERVER_EXITED, why)
        pending, self.pending = self.pending, {}
        self._pending_work = 0
        for item in pending.values():
            if item.kind in (SESSION, CALL) and item.counted:
                self._count(item.kind, item.method, FAILED)
            if item.kind == CALL and item.future is not None and not item.future.done():
                item.future.set_result({"id": None, "error": error})
            elif item.kind == SESSION and item.session is not None:
                item.session.push(error_response(item.client_id, error))
        self.turns.clear()
        self.server_requests.clear()
        self.parents.clear()
        self.children.clear()
        self._orphans.clear()
        self._orphan_bytes = 0
        for session in list(self.sessions.values()):
            session.end(Ending(EndReason.APP_SERVER_GONE, why))
        self._on_change()
