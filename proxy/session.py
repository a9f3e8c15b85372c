"""One client Session: its subscriptions and pending work, and its bounded outgoing buffer.

Everything the hub sends to a Session goes through ``push`` in app-server order; its front end
drains the buffer in batches (``next_batch``; the gRPC handler sends many messages per
ServerFrame), which is what keeps a delta-heavy turn cheap. A Session whose backlog passes its
limit is dropped at that moment: its buffer is freed and its handler is told to end
(SLOW_CLIENT).

Nothing here knows the transport: a Session ends with an ``Ending`` (a reason and details),
which each front end turns into its own terms (service.py: a gRPC status; jsonl.py: a last
JSON-RPC error line). The front end that opens a Session gives it its name and the error its
new work gets while the broker drains."""
from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy import jsonrpc
from proxy.frames import encode_frame

BATCH_MAX_MESSAGES = 4096
BATCH_MAX_BYTES = 1 << 20
# Messages at least this big are tracked one by one: the largest one queued does not count
# against the limit, so one big result (a long thread history) does not get a Session that
# keeps reading dropped while the deltas behind it arrive.
LARGE_MESSAGE = 1 << 20


class EndReason(enum.Enum):
    """Why a Session ended."""
    OK = "ok"  # the client finished, or the broker stopped after delivering everything
    SLOW_CLIENT = "slow client"  # fell further behind than its buffer allows
    APP_SERVER_GONE = "app-server gone"  # the app-server exited: nothing more can be served
    STOPPING = "stopping"  # the broker refuses new work for good
    INTERNAL = "internal"  # a fault of the broker's own while routing the Session's messages


@dataclass(frozen=True)
class Ending:
    """How a Session ends: its reason, details for the client, and whether what is buffered
    is delivered first."""
    reason: EndReason = EndReason.OK
    details: str = ""
    flush: bool = True

    @property
    def ok(self) -> bool:
        return self.reason is EndReason.OK


@dataclass(eq=False)
class Session:
    id: str
    limit_bytes: int
    on_overflow: Callable[[Session], None]
    opened_at: float = field(default_factory=time.time)
    client_name: str = ""
    transport: str = "grpc"  # the front end's name, for Status
    counted: bool = True  # counted as a Session in the metrics (False: maybe a connect-and-close check)
    # What new work gets while the broker drains: each front end says (the codes differ).
    draining_error: dict[str, Any] = field(default_factory=lambda: jsonrpc.DRAINING_ERROR)
    initialized: bool = False
    opt_out: frozenset[str] = frozenset()
    half_closed: bool = False
    pending: set[int] = field(default_factory=set)  # proxy ids of its requests awaiting a response
    threads: set[str] = field(default_factory=set)  # subscriptions
    turns: set[tuple[str, str]] = field(default_factory=set)  # (thread, turn) it started, running
    starting: collections.Counter[str] = field(default_factory=collections.Counter)  # thread -> turns announced
    server_requests: set[int] = field(default_factory=set)  # local ids sent to it, unanswered
    ending: Ending | None = None
    handler: asyncio.Task[None] | None = None
    _queue: collections.deque[bytes] = field(default_factory=collections.deque)
    _queued_bytes: int = 0
    _large: collections.deque[int] = field(default_factory=collections.deque)  # sizes, in queue order
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _runs: bool = False  # a run of lines (push_lines) may be among the queued texts
    # A front end that writes at once when it can (JSONL: one loop pass less per answer); it
    # takes what is queued with take_batch, in order, and leaves the rest to next_batch.
    on_push: Callable[[], None] | None = None

    @property
    def open(self) -> bool:
        return self.ending is None

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def finished_work(self) -> bool:
        return not self.pending and not self.turns and not self.starting

    def push(self, text: bytes) -> None:
        self.push_many([text])

    def push_many(self, texts: list[bytes]) -> None:
        """Queues messages (encoded) in order; a Session already further behind than its limit,
        not counting its largest message, is dropped instead. Consecutive messages of one
        routing pass come here together: the limit is checked once for them."""
        if self.ending is not None:
            return
        backlog = self._queued_bytes - (max(self._large) if self._large else 0)
        if backlog > self.limit_bytes:
            self.on_overflow(self)
            return
        size = sum(map(len, texts))
        self._queue.extend(texts)
        self._queued_bytes += size
        if size >= LARGE_MESSAGE:
            self._large.extend(n for n in map(len, texts) if n >= LARGE_MESSAGE)
        if self.on_push is not None:
            self.on_push()  # may take everything: then the front end's task is not woken for nothing
            if not self._queue:
                return
        self._wake.set()

    def push_lines(self, body: bytes) -> None:
        """Queues the messages of ``body``, one per line, joined by newlines, as one text (one
        object, where thousands of small ones would each cost their own header): what a batch
        holds is then a run of lines rather than one message each. No message ever holds a
        newline of its own (each is one line of JSON), so a front end that writes lines writes
        it as it is, and the gRPC frame splits it again (``next_frame``)."""
        if len(body) < LARGE_MESSAGE:
            self.push_many([body])
            self._runs = True
        else:
            self.push_many(body.split(b"\n"))

    def end(self, ending: Ending) -> None:
        """Ends the Session's RPC (first call wins); an ending without flush frees the buffer."""
        if self.ending is not None:
            return
        self.ending = ending
        if not ending.flush:
            self._queue.clear()
            self._large.clear()
            self._queued_bytes = 0
        self._wake.set()

    async def next_frame(self) -> bytes | None:
        """The next ServerFrame, encoded (proxy/frames.py); None when the Session is over."""
        batch = await self.next_batch()
        if batch is None:
            return None
        if self._runs:  # a run of lines queued whole (the flag is cleared only here): one message per line again
            batch = b"\n".join(batch).split(b"\n")
            self._runs = bool(self._queue)
        return encode_frame(batch)

    async def next_batch(self) -> list[bytes] | None:
        """The oldest messages, as many as fit a batch; None when the Session is over."""
        while not self._queue:
            if self.ending is not None:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self.take_batch()

    def take_batch(self) -> list[bytes]:
        """The oldest messages queued now, as many as fit a batch ([] when none)."""
        queue = self._queue
        if len(queue) <= BATCH_MAX_MESSAGES and self._queued_bytes <= BATCH_MAX_BYTES and not self._large:
            batch = list(queue)  # the usual case: everything queued fits one frame
            queue.clear()
            self._queued_bytes = 0
            return batch
        batch = []
        size = 0
        while queue and len(batch) < BATCH_MAX_MESSAGES and size < BATCH_MAX_BYTES:
            text = queue.popleft()
            size += len(text)
            batch.append(text)
            if len(text) >= LARGE_MESSAGE:
                self._large.popleft()
        self._queued_bytes -= size
        return batch
