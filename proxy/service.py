"""gRPC servicers: AppServer (Session, Call) and Broker (Status, Drain).

Exceptions become gRPC status here and only here: a known ending keeps its status, anything
else is logged with its traceback and reported as INTERNAL; cancellation passes through."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

import grpc

from protos import broker_pb2, broker_pb2_grpc
from proxy import jsonrpc
from proxy.session import Session as ClientSession
from proxy.text import proto_text, proto_texts

if TYPE_CHECKING:
    from proxy.broker import Broker

log = logging.getLogger("codex_broker.proxy")


def _reply_from(msg: dict[str, Any]) -> broker_pb2.CallReply:
    err = msg.get("error")
    if err is not None:
        if not isinstance(err, dict):
            err = {"code": jsonrpc.INTERNAL_ERROR, "message": str(err)}
        code = err.get("code")
        return broker_pb2.CallReply(error=broker_pb2.JsonRpcError(
            code=code if isinstance(code, int) and not isinstance(code, bool) else jsonrpc.INTERNAL_ERROR,
            message=str(err.get("message", "")),
            data_json=jsonrpc.dumps_text(err["data"]) if "data" in err else ""))
    return broker_pb2.CallReply(result_json=jsonrpc.dumps_text(msg.get("result")))


class AppServerService(broker_pb2_grpc.AppServerServicer):
    def __init__(self, broker: Broker):
        self.broker = broker

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        broker = self.broker
        if not broker.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"broker is {broker.state_name.lower()}: open a Session on a new broker")
        hub = broker.hub
        session = hub.open_session()
        session.handler = asyncio.current_task()
        log.info("session %s opened (%d open)", session.id, len(hub.sessions))
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            while (frame := await session.next_frame()) is not None:
                await context.write(frame)  # already an encoded ServerFrame (proxy/frames.py)
        except asyncio.CancelledError:
            if session.ending is None or session.ending.code is None:
                raise  # the client went away, or the server is stopping
        finally:
            reader.cancel()
            hub.close_session(session)
            log.info("session %s closed (%d open)%s", session.id, len(hub.sessions),
                     f": {session.ending.details}" if session.ending and session.ending.code else "")
        assert session.ending is not None
        if session.ending.code is not None:
            context.set_code(session.ending.code)
            context.set_details(session.ending.details)

    async def _read(self, session: ClientSession, request_iterator: Any) -> None:
        hub = self.broker.hub
        try:
            async for frame in request_iterator:
                hub.from_client(session, frame.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke under us: the handler ends it
            log.info("session %s: reading failed: %r", session.id, exc)
            return
        hub.half_close(session)

    async def Call(self, request: broker_pb2.CallRequest, context: grpc.aio.ServicerContext  # noqa: N802
                   ) -> broker_pb2.CallReply:
        broker = self.broker
        if broker.state_name == "STOPPING":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broker is stopping")
        if not request.method:
            return _reply_from({"error": jsonrpc.error(jsonrpc.INVALID_REQUEST, "Invalid request: method is required")})
        params: Any = {}
        if request.params_json:
            try:
                params = jsonrpc.loads(request.params_json)
            except jsonrpc.DecodeError as exc:
                return _reply_from({"error": jsonrpc.error(jsonrpc.PARSE_ERROR, f"Parse error in params_json: {exc}")})
        return _reply_from(await broker.hub.call(request.method, params))


class BrokerService(broker_pb2_grpc.BrokerServicer):
    def __init__(self, broker: Broker):
        self.broker = broker

    async def Status(self, request: broker_pb2.StatusRequest, context: grpc.aio.ServicerContext  # noqa: N802
                     ) -> broker_pb2.BrokerStatus:
        return self.broker.status()

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
        queued_bytes=s.queued_bytes, opt_out_notification_methods=proto_texts(sorted(s.opt_out)))
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
        idle_timeout_seconds=cfg.idle_timeout)


def add_app_server_service(server: grpc.aio.Server, service: AppServerService) -> None:
    """As the generated add_AppServerServicer_to_server, but Session frames are written
    pre-encoded (no response serializer): see proxy/frames.py."""
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session, request_deserializer=broker_pb2.ClientFrame.FromString, response_serializer=None),
        "Call": grpc.unary_unary_rpc_method_handler(
            service.Call, request_deserializer=broker_pb2.CallRequest.FromString,
            response_serializer=broker_pb2.CallReply.SerializeToString),
    }
    name = broker_pb2.DESCRIPTOR.services_by_name["AppServer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
