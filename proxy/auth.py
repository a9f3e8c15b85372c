"""The token guard: with ``--token-file`` (required on TCP, optional on a unix socket) every RPC
but grpc.health.v1 must carry ``authorization: Bearer <token>``, the token read from a file
only its owner can read.

Reflection without the token is answered by a servicer that knows Health alone
(``proxy.health.health_reflection``), so grpcurl can find and call Health with no secret while
every other service, symbol and file stays hidden; with the token, reflection describes
everything. (On a unix socket the socket's 0600 mode in a 0700 directory is the access
boundary; a token there is a second lock, for a socket directory shared more widely.)"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses with UNAUTHENTICATED any RPC but Health without the right bearer token;
    reflection without it is answered by ``public_reflection`` (Health only)."""

    def __init__(self, token: str, public_reflection: Any):
        self._expected = f"Bearer {token}".encode()
        self._public_reflection = public_reflection

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or \
                self._authorized(details.invocation_metadata):
            return handler
        if details.method.startswith(REFLECTION_PREFIXES):
            return grpc.stream_stream_rpc_method_handler(
                self._public_reflection.ServerReflectionInfo, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "this broker was started with --token-file: send 'authorization: Bearer <token>' "
                            "with the token from that file")

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
