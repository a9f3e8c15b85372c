"""One JSON-RPC client, four transports: the same Python code talks to the fake app-server
over its own stdio pipes (the physical limit), to the broker's JSONL front end over a unix
socket (the same ``JsonlClient`` class as direct), and to the broker over an
``AppServer.Session`` stream (the tests' own Session client, tests/harness.py); ``CallClient``
sends the same requests as ``AppServer.Call`` RPCs.

    client = await JsonlClient.spawn([python, fake])      # client.process is the child
    client = await JsonlClient.connect("/path/j.sock")   # one JSONL Session of a broker
    client = await SessionClient.open("unix:/path/s.sock")
    await client.initialize()
    client.set_notification_handler(lambda method, params: ...)
    result = await client.request("account/read", {})  # RpcError on an error response
    await client.close()

Messages are decoded with the standard ``json`` module on every transport, so the client's
own cost is the same whichever way the messages travel (adapted from the peer-bench harness)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc

from protos import broker_pb2, broker_pb2_grpc
from tests.harness import CHANNEL_OPTIONS
from tests.harness import SessionClient as HarnessSession

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_CHUNK = 1 << 16
Handler = Callable[[str, dict[str, Any]], None]


class RpcError(Exception):
    def __init__(self, code: int | None, message: str | None, data: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.data = code, message, data


class RpcClient:
    """The transport-independent half: ids, pending futures, dispatch of incoming messages."""

    def __init__(self) -> None:
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._on_notification: Handler | None = None
        self._closed = False

    # -- to be provided by a transport ---------------------------------------------------
    async def _write(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    # -- the client API ------------------------------------------------------------------
    def set_notification_handler(self, handler: Handler | None) -> None:
        self._on_notification = handler

    async def request(self, method: str, params: Any = None) -> Any:
        if self._closed:
            raise ConnectionError("client is closed")
        req_id = self._next_id
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        try:
            await self._write({"id": req_id, "method": method, "params": params or {}})
        except (grpc.RpcError, asyncio.InvalidStateError, OSError) as exc:
            self._pending.pop(req_id, None)
            raise ConnectionError(f"sending failed: {exc!r}") from None
        return await future

    async def notify(self, method: str, params: Any = None) -> None:
        await self._write({"method": method, "params": params or {}})

    async def initialize(self, name: str = "bench", opt_out: list[str] | None = None) -> Any:
        caps: dict[str, Any] = {"experimentalApi": False}
        if opt_out:
            caps["optOutNotificationMethods"] = opt_out
        result = await self.request("initialize", {"clientInfo": {"name": name, "title": name, "version": "0"},
                                                   "capabilities": caps})
        await self.notify("initialized")
        return result

    # -- incoming ------------------------------------------------------------------------
    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg and "method" in msg:  # a server->client request: decline it
            asyncio.get_running_loop().create_task(self._decline(msg))
        elif "id" in msg:
            future = self._pending.pop(msg["id"], None)
            if future is None or future.done():
                return
            error = msg.get("error")
            if error is not None:
                future.set_exception(RpcError(error.get("code"), error.get("message"), error.get("data")))
            else:
                future.set_result(msg.get("result"))
        elif "method" in msg and self._on_notification is not None:
            self._on_notification(msg["method"], msg.get("params") or {})

    async def _decline(self, msg: dict[str, Any]) -> None:
        try:
            await self._write({"id": msg["id"], "error": {"code": -32601, "message": "not handled by the bench"}})
        except (grpc.RpcError, asyncio.InvalidStateError, OSError):
            pass

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)


class JsonlClient(RpcClient):
    """JSONL over any (reader, writer) stream pair: a child's stdout/stdin (direct, the
    physical limit) or a unix socket (the broker's JSONL front end). The same code both ways.

    ``read_delay`` > 0 makes a slow reader: it sleeps that long after every read of up to 64 KiB.
    ``ended`` resolves when the other side closes: ("OVERLOADED", message) if its last error
    line (id null) was -32001, else ("EOF", "")."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 process: asyncio.subprocess.Process | None = None, read_delay: float = 0.0):
        super().__init__()
        self.process = process
        self._reader, self._writer = reader, writer
        self.read_delay = read_delay
        self.messages = 0
        self._last_error: dict[str, Any] | None = None
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[tuple[str, str]] = loop.create_future()
        self._read_task = loop.create_task(self._read_loop())

    @classmethod
    async def spawn(cls, argv: list[str], **kwargs: Any) -> JsonlClient:
        """A child speaking JSONL on its stdio (``client.process``)."""
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, limit=_CHUNK, **kwargs)
        assert proc.stdout is not None and proc.stdin is not None
        return cls(proc.stdout, proc.stdin, process=proc)

    @classmethod
    async def connect(cls, path: str, read_delay: float = 0.0) -> JsonlClient:
        """One connection to a JSONL unix socket (one broker Session)."""
        reader, writer = await asyncio.open_unix_connection(path, limit=_CHUNK)
        return cls(reader, writer, read_delay=read_delay)

    async def _write(self, obj: dict[str, Any]) -> None:
        self._writer.write(_DUMPS(obj).encode() + b"\n")
        await self._writer.drain()

    async def close(self) -> None:
        """EOF to the other side (a child exits; the broker closes the Session), then stop reading."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
        except (OSError, RuntimeError):
            pass
        self._read_task.cancel()
        try:
            await self._read_task
        except asyncio.CancelledError:
            pass
        self._fail_pending(ConnectionError("client closed"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        self.messages += 1
        if msg.get("id", 0) is None and "error" in msg:
            self._last_error = msg["error"]
        super()._dispatch(msg)

    async def _read_loop(self) -> None:
        buf = b""
        try:
            while chunk := await self._reader.read(_CHUNK):
                buf += chunk
                if b"\n" in chunk:
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self._dispatch(json.loads(line))
                if self.read_delay:
                    await asyncio.sleep(self.read_delay)
        except (OSError, ValueError) as exc:
            self._fail_pending(ConnectionError(f"transport failed: {exc!r}"))
        finally:
            self._fail_pending(ConnectionError("connection closed by peer"))
            if not self.ended.done():
                error = self._last_error or {}
                self.ended.set_result(("OVERLOADED", str(error.get("message", ""))) if error.get("code") == -32001
                                      else ("EOF", ""))


class SessionClient(RpcClient):
    """One AppServer.Session stream: the test harness's Session client (ServerFrames may carry
    many messages) with nothing recorded, every message dispatched here as it arrives.

    ``read_delay`` > 0 makes a slow reader: it sleeps that long after every frame."""

    def __init__(self, channel: grpc.aio.Channel, read_delay: float = 0.0):
        super().__init__()
        self._channel = channel
        self.session = HarnessSession(channel, record=False, read_delay=read_delay, on_message=self._dispatch)
        self.ended: asyncio.Task[tuple[str, str]] = asyncio.get_running_loop().create_task(self._ending())

    @classmethod
    async def open(cls, endpoint: str, read_delay: float = 0.0) -> SessionClient:
        return cls(grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS), read_delay)

    @property
    def frames(self) -> int:
        return self.session.frames

    @property
    def messages(self) -> int:
        return self.session.received

    @property
    def read_delay(self) -> float:
        return self.session.read_delay

    @read_delay.setter
    def read_delay(self, seconds: float) -> None:
        self.session.read_delay = seconds

    async def _ending(self) -> tuple[str, str]:
        """How the stream ended; pending requests fail then."""
        code = await self.session.wait_end(None)
        status = (code.name if code is not None else "CANCELLED", self.session.details or "")
        self._fail_pending(ConnectionError(f"session ended: {status[0]} {status[1]}"))
        return status

    async def _write(self, obj: dict[str, Any]) -> None:
        await self.session.send_text(_DUMPS(obj))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.session.close()
        await self._channel.close()
        self._fail_pending(ConnectionError("client closed"))


class CallClient:
    """``AppServer.Call``: one unary RPC per request, no Session."""

    def __init__(self, channel: grpc.aio.Channel):
        self._channel = channel
        self._stub = broker_pb2_grpc.AppServerStub(channel)

    @classmethod
    def open(cls, endpoint: str) -> CallClient:
        return cls(grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS))

    async def request(self, method: str, params: Any = None) -> Any:
        reply = await self._stub.Call(broker_pb2.CallRequest(method=method, params_json=_DUMPS(params or {})))
        if reply.WhichOneof("outcome") == "error":
            raise RpcError(reply.error.code, reply.error.message)
        return json.loads(reply.result_json) if reply.result_json else None

    async def close(self) -> None:
        await self._channel.close()
