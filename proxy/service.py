"""gRPC servicers: AppServer (Session, Call) and Broker (Status, Drain).

Errors become gRPC statuses here and only here: a Session's ending reason (proxy/session.py)
maps to its status; an expected error (an abort) keeps its status; any other exception is
logged with its traceback and reported as INTERNAL (an exception while routing a client's
message ends that Session so); cancellation passes through.

AppServer's requests are read by hand (proxy/frames.py): protobuf would refuse a string field
that is not UTF-8 before any handler runs, and the client would get no JSON-RPC answer. The
hub judges the bytes. Session frames are written pre-encoded (no response serializer)."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import msgspec

from protos import broker_pb2, broker_pb2_grpc
from proxy import frames, jsonrpc
from proxy.session import Ending, EndReason
from proxy.session import Session as ClientSession
from proxy.text import proto_text, proto_texts

if TYPE_CHECKING:
    from proxy.broker import Broker

log = logging.getLogger("codex_broker.proxy")

STATUS_OF: dict[EndReason, grpc.StatusCode | None] = {
    EndReason.OK: None,
    EndReason.SLOW_CLIENT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EndReason.APP_SERVER_GONE: grpc.StatusCode.UNAVAILABLE,
    EndReason.STOPPING: grpc.StatusCode.UNAVAILABLE,  # also a Session opened on a broker that drains
    EndReason.INTERNAL: grpc.StatusCode.INTERNAL,
}
_INT64 = range(-(2**63), 2**63)
_R = TypeVar("_R")


def _statuses(handler: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_R]]
              ) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_R]]:
    """An RPC handler whose unexpected exceptions are logged with their traceback and become
    INTERNAL (gRPC would say UNKNOWN); aborts and cancellation pass through."""
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _R:
        try:
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the broker: {exc!r}"[:1000])
            raise  # not reached: abort raises
    return wrapper


def _text(value: Any) -> str:
    """JSON text of a member: relayed as it is (msgspec.Raw), or encoded."""
    if isinstance(value, msgspec.Raw):
        return bytes(value).decode()
    return jsonrpc.dumps_text(value)


def _reply_from(msg: dict[str, Any]) -> broker_pb2.CallReply:
    """A CallReply from a response: the app-server's (members as JSON text) or the proxy's own."""
    if "error" in msg and msg["error"] is not None:
        err = msg["error"]
        if isinstance(err, msgspec.Raw):
            err = jsonrpc.value(err)
        if not isinstance(err, dict):
            err = {"code": jsonrpc.INTERNAL_ERROR, "message": str(err)}
        code = err.get("code")
        return broker_pb2.CallReply(error=broker_pb2.JsonRpcError(
            code=code if type(code) is int and code in _INT64 else jsonrpc.INTERNAL_ERROR,
            message=str(err.get("message", "")),
            data_json=jsonrpc.dumps_text(err["data"]) if "data" in err else ""))
    return broker_pb2.CallReply(result_json=_text(msg.get("result")))


def _call_args(data: bytes) -> tuple[bytes, bytes] | frames.FrameError:
    """CallRequest's method and params_json as bytes, or why the request cannot be read."""
    try:
        fields = frames.read_fields(data)
    except frames.FrameError as exc:
        return exc
    return fields.get(1, b""), fields.get(2, b"")


def _reply_error(code: int, message: str) -> broker_pb2.CallReply:
    return _reply_from({"error": jsonrpc.error(code, message)})


class AppServerService:
    """AppServer, registered by hand (``add_app_server_service``) rather than through the
    generated servicer: its requests are read by the service's own deserializers and its
    Session frames are written pre-encoded, so its signatures differ from the generated ones."""

    def __init__(self, broker: Broker):
        self.broker = broker

    @_statuses
    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        broker = self.broker
        if not broker.accepting:
            refused = STATUS_OF[EndReason.STOPPING]
            assert refused is not None
            await context.abort(refused, f"broker is {broker.state_name.lower()}: open a Session on a new broker")
        hub = broker.hub
        session = hub.open_session()
        session.handler = asyncio.current_task()
        log.info("session %s opened (%d open)", session.id, len(hub.sessions))
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            while (frame := await session.next_frame()) is not None:
                await context.write(frame)  # already an encoded ServerFrame (proxy/frames.py)
        except asyncio.CancelledError:
            if session.ending is None or session.ending.ok:
                raise  # the client went away, or the server is stopping
        finally:
            reader.cancel()
            hub.close_session(session)
            log.info("session %s closed (%d open)%s", session.id, len(hub.sessions),
                     f": {session.ending.details}" if session.ending and not session.ending.ok else "")
        assert session.ending is not None
        code = STATUS_OF[session.ending.reason]
        if code is not None:
            context.set_code(code)
            context.set_details(session.ending.details)

    async def _read(self, session: ClientSession, request_iterator: Any) -> None:
        """Routes the client's frames in order, each one before the next is read."""
        hub = self.broker.hub
        frames_in = aiter(request_iterator)
        while True:
            try:
                data = await anext(frames_in)
            except StopAsyncIteration:
                hub.half_close(session)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream broke under us: the handler ends it
                log.info("session %s: reading failed: %r", session.id, exc)
                return
            try:
                if isinstance(data, frames.FrameError):
                    hub.refuse(session, jsonrpc.Refusal(jsonrpc.error(
                        jsonrpc.PARSE_ERROR, f"Parse error: not a ClientFrame ({data})")))
                else:
                    await hub.receive(session, data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("session %s: internal error while routing a client message; ending it", session.id)
                session.end(Ending(EndReason.INTERNAL, f"internal error in the broker: {exc!r}"[:1000]))
                return

    @_statuses
    async def Call(self, request: tuple[bytes, bytes] | frames.FrameError,  # noqa: N802
                   context: grpc.aio.ServicerContext) -> broker_pb2.CallReply:
        broker = self.broker
        if broker.state_name == "STOPPING":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broker is stopping")
        if isinstance(request, frames.FrameError):
            return _reply_error(jsonrpc.PARSE_ERROR, f"Parse error: not a CallRequest ({request})")
        method_bytes, params_json = request
        try:
            method = method_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return _reply_error(jsonrpc.INVALID_REQUEST, "Invalid request: method is not UTF-8")
        if not method:
            return _reply_error(jsonrpc.INVALID_REQUEST, "Invalid request: method is required")
        params = jsonrpc.read_params(params_json)
        if isinstance(params, jsonrpc.Refusal):
            return _reply_from({"error": params.error})
        return _reply_from(await broker.hub.call(method, params))


class BrokerService(broker_pb2_grpc.BrokerServicer):
    def __init__(self, broker: Broker):
        self.broker = broker

    @_statuses
    async def Status(self, request: broker_pb2.StatusRequest, context: grpc.aio.ServicerContext  # noqa: N802
                     ) -> broker_pb2.BrokerStatus:
        return self.broker.status()

    @_statuses
    async def Drain(self, request: broker_pb2.DrainRequest, context: grpc.aio.ServicerContext  # noqa: N802
                    ) -> broker_pb2.DrainReply:
        broker = self.broker
        peer = context.peer() or "?"
        reason = request.reason or f"Drain RPC from {peer}"
        broker.drain(request.deadline_seconds if request.deadline_seconds > 0 else None,
                     reason=reason, force=request.force)
        hub = broker.hub
        return broker_pb2.DrainReply(state=broker.state, in_flight_turns=len(hub.turns),
                                     pending_requests=hub.pending_work)


def status_message(broker: Broker) -> broker_pb2.BrokerStatus:
    """The Status reply. Every string goes through proto_text: a path that is not valid UTF-8
    (a workspace named so), or a lone surrogate from a client's JSON, must not fail the RPC."""
    hub = broker.hub
    health = broker.health
    app = broker.app
    turns = [broker_pb2.InFlightTurn(thread_id=proto_text(t.thread_id), turn_id=proto_text(t.turn_id),
                                     started_at=t.started_at, session_id=t.owner.id if t.owner else "")
             for t in hub.turns.values()]
    sessions = [broker_pb2.SessionInfo(
        session_id=s.id, opened_at=s.opened_at, client_name=proto_text(s.client_name),
        pending_requests=len(s.pending), subscribed_threads=len(s.threads), half_closed=s.half_closed,
        queued_bytes=s.queued_bytes, opt_out_notification_methods=proto_texts(sorted(s.opt_out)),
        transport=s.transport)
        for s in hub.sessions.values()]
    cfg = broker.config
    return broker_pb2.BrokerStatus(
        instance_id=proto_text(cfg.instance_id), pid=os.getpid(), started_at=broker.started_at, state=broker.state,
        app_server_pid=app.pid or 0 if app else 0, app_server_alive=bool(app and app.alive),
        app_server_create_time_ms=broker.app_server_create_time_ms,
        last_probe_at=health.last_probe_at, last_probe_latency_ms=health.last_probe_latency * 1000,
        open_sessions=len(hub.sessions), in_flight_turns=turns, pending_requests=hub.pending_work,
        version=broker.version, cwd=proto_text(cfg.cwd), endpoint=proto_text(cfg.endpoint), sessions=sessions,
        app_server_command=proto_texts(cfg.app_server), codex_home=proto_text(cfg.codex_home),
        health="SERVING" if health.serving() else "NOT_SERVING",
        last_response_at=broker.wall_time(hub.last_response) if hub.last_response else 0.0,
        drain_deadline=broker.drain_deadline_unix, drain_reason=proto_text(broker.drain_reason),
        idle_timeout_seconds=cfg.idle_timeout, max_age_hours=cfg.max_age_seconds / 3600.0,
        exit_when_wedged_seconds=cfg.exit_when_wedged)


def add_app_server_service(server: grpc.aio.Server, service: AppServerService) -> None:
    """As the generated add_AppServerServicer_to_server, but requests are read by hand (string
    fields as bytes) and Session frames are written pre-encoded: see proxy/frames.py."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session, request_deserializer=frames.client_message, response_serializer=None),
        "Call": grpc.unary_unary_rpc_method_handler(
            service.Call, request_deserializer=_call_args,
            response_serializer=broker_pb2.CallReply.SerializeToString),
    }
    name = broker_pb2.DESCRIPTOR.services_by_name["AppServer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
