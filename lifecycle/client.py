"""A synchronous client of one broker: Health, Status, Drain, Call, and Sessions that follow a
turn to its end.

Every wait is bounded. A Session reads on its own thread; when the broker or the app-server
goes away the stream ends with an error, which every waiter sees at once as SessionClosed
(keepalive pings catch a broker that stops answering without closing the socket)."""
from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lifecycle.errors import (
    AppServerError,
    BrokerError,
    CallTimeout,
    ConnectError,
    HealthTimeout,
    RpcFailed,
    SessionClosed,
)
from protos import broker_pb2, broker_pb2_grpc
from proxy.contract import CHANNEL_OPTIONS

HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}
_CLOSE = object()


def rpc_error(code: grpc.StatusCode | None, details: str | None, *, what: str, endpoint: str,
              timeout: float | None) -> BrokerError:
    """The one place a gRPC status becomes a client error (and so a CLI exit code).

    UNAVAILABLE is "cannot connect" (ConnectError, 2); DEADLINE_EXCEEDED a timeout (HealthTimeout
    for Health, CallTimeout otherwise, 3); every other code, UNAUTHENTICATED and INTERNAL
    included, is an RPC that reached the broker and failed (RpcFailed, 3)."""
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ConnectError(f"cannot reach the broker at {endpoint}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        after = f" after {timeout:g} s" if timeout is not None else ""
        return (HealthTimeout if what == "Health" else CallTimeout)(f"{what} to {endpoint} timed out{after}")
    return RpcFailed(f"{what} to {endpoint} failed: {name}: {details}", name)


def _loads(text: str) -> Any:
    return json.loads(text)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)



def state_name(value: int) -> str:
    """A BrokerState's short name (SERVING, DRAINING, ...); a value this client does not know
    (a newer broker's) reads UNKNOWN(n)."""
    try:
        return broker_pb2.BrokerState.Name(value).removeprefix("BROKER_STATE_")
    except ValueError:
        return f"UNKNOWN({value})"


class BrokerClient:
    """One channel to one broker endpoint: ``unix:PATH``, or ``tcp:HOST:PORT`` with the broker's
    bearer ``token``."""

    def __init__(self, endpoint: str, *, token: str | None = None):
        self.endpoint = endpoint
        target = endpoint[len("tcp:"):] if endpoint.startswith("tcp:") else endpoint
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._app = broker_pb2_grpc.AppServerStub(self.channel)
        self._broker = broker_pb2_grpc.BrokerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rpc_error(self, exc: grpc.RpcError, what: str, timeout: float | None) -> BrokerError:
        call = exc if isinstance(exc, grpc.Call) else None  # what grpc raises is both
        return rpc_error(call.code() if call else None, call.details() if call else str(exc), what=what,
                         endpoint=self.endpoint, timeout=timeout)

    def wait_connected(self, timeout: float) -> None:
        """ConnectError unless the socket accepts a connection within ``timeout``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectError(f"cannot connect to the broker at {self.endpoint} within {timeout:g} s") from None

    def health(self, service: str = "", timeout: float = 2.0) -> str:
        """SERVING, NOT_SERVING, ... as grpc.health.v1 names them."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, "Health", timeout) from None
        return HEALTH_NAMES.get(reply.status, str(reply.status))

    def status(self, timeout: float = 2.0) -> broker_pb2.BrokerStatus:
        try:
            return self._broker.Status(broker_pb2.StatusRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, "Status", timeout) from None

    def drain(self, deadline_seconds: float = 0.0, *, reason: str = "", force: bool = False,
              timeout: float = 5.0) -> broker_pb2.DrainReply:
        """Asks the broker to drain; ``deadline_seconds`` <= 0 means the broker's default."""
        request = broker_pb2.DrainRequest(deadline_seconds=deadline_seconds, reason=reason, force=force)
        try:
            return self._broker.Drain(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, "Drain", timeout) from None

    def call(self, method: str, params: Any = None, timeout: float | None = 60.0) -> Any:
        """One request without a Session; the result, or AppServerError for an error response."""
        request = broker_pb2.CallRequest(method=method, params_json=_dumps(params) if params is not None else "")
        try:
            reply = self._app.Call(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, f"Call {method}", timeout) from None
        if reply.WhichOneof("outcome") == "error":
            err = reply.error
            raise AppServerError(err.code, err.message, _loads(err.data_json) if err.data_json else None)
        return _loads(reply.result_json) if reply.result_json else None

    def session(self) -> Session:
        return Session(self._app, self._metadata)


class Session:
    """One AppServer.Session stream: JSON-RPC requests, notifications and server requests."""

    def __init__(self, stub: broker_pb2_grpc.AppServerStub, metadata: Any = None):
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._events: queue.Queue[Any] = queue.Queue()
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.closed: SessionClosed | None = None
        self._call = stub.Session(self._frames(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="broker-session", daemon=True)
        self._reader.start()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frames(self) -> Iterator[broker_pb2.ClientFrame]:
        while (item := self._outbox.get()) is not _CLOSE:
            yield broker_pb2.ClientFrame(message=item)

    def _read(self) -> None:
        try:
            for frame in self._call:
                for text in frame.messages:
                    self._dispatch(_loads(text))
            self._fail(SessionClosed("the broker ended the Session"))
        except grpc.RpcError as exc:
            self._fail(SessionClosed(f"the Session ended: {exc.code().name}: {exc.details()}"))
        except Exception as exc:  # a message that is not JSON: the contract is broken
            self._fail(SessionClosed(f"the Session failed: {exc!r}"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "method" not in msg and "id" in msg:
            with self._lock:
                future = self._pending.pop(msg["id"], None) if isinstance(msg["id"], int) else None
            if future is not None:
                future.set_result(msg)
                return
        self._events.put(msg)

    def _fail(self, exc: SessionClosed) -> None:
        with self._lock:
            self.closed = exc
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(exc)
        self._events.put(exc)

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed is not None:
            raise self.closed
        self._outbox.put(_dumps(msg))

    def request(self, method: str, params: Any = None, timeout: float | None = 60.0) -> Any:
        """Sends a request and waits for its result; AppServerError for an error response."""
        future: Future[Any] = Future()
        with self._lock:
            if self.closed is not None:
                raise self.closed
            req_id = next(self._ids)
            self._pending[req_id] = future
        self._outbox.put(_dumps({"id": req_id, "method": method, "params": params if params is not None else {}}))
        try:
            reply = future.result(timeout)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(req_id, None)
            raise CallTimeout(f"{method} got no response within {timeout:g} s") from None
        if "error" in reply:
            raise AppServerError.from_error(reply["error"])
        return reply.get("result")

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"method": method, "params": params if params is not None else {}})

    def respond(self, request_id: Any, result: Any = None, error: dict[str, Any] | None = None) -> None:
        """Answers a server->client request."""
        self.send({"id": request_id, "error": error} if error is not None else {"id": request_id, "result": result})

    def initialize(self, name: str = "codex-broker-client", opt_out: list[str] | None = None) -> Any:
        caps: dict[str, Any] = {"experimentalApi": True}
        if opt_out:
            caps["optOutNotificationMethods"] = opt_out
        result = self.request("initialize", {"clientInfo": {"name": name, "title": name, "version": "0"},
                                             "capabilities": caps})
        self.notify("initialized")
        return result

    def next_message(self, timeout: float | None = None) -> dict[str, Any]:
        """The next notification or server request; SessionClosed when the stream has ended."""
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            raise CallTimeout(f"no message within {timeout:g} s") from None
        if isinstance(item, SessionClosed):
            self._events.put(item)  # every later waiter sees it too
            raise item
        return item

    def follow_turn(self, thread_id: str, turn_id: str | None = None, *, timeout: float | None = None,
                    on_message: Callable[[dict[str, Any]], None] | None = None,
                    on_server_request: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """Reads until ``turn/completed`` for the thread (and turn); returns its ``turn``.

        Server requests go to ``on_server_request`` (its return value is the result), or are
        declined. Raises SessionClosed at once if the broker or the app-server goes away."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self.next_message(remaining)
            if on_message is not None:
                on_message(msg)
            params = msg.get("params") or {}
            if "id" in msg and "method" in msg:
                if on_server_request is None:
                    self.respond(msg["id"], error={"code": -32601, "message": "request not handled by this client"})
                else:
                    self.respond(msg["id"], on_server_request(msg))
            elif msg.get("method") == "turn/completed" and params.get("threadId") == thread_id:
                turn = params.get("turn") or {}
                if turn_id is None or turn.get("id") == turn_id:
                    return turn

    def close(self) -> None:
        """Half-closes, then cancels the stream."""
        self._outbox.put(_CLOSE)
        self._call.cancel()
        self._reader.join(timeout=2)
