"""A JSONL client for the broker's JSONL front end, with the same methods as conftest's gRPC
SessionClient (send, request, result, respond, initialize, until, next, wait_end, close), so
one behaviour test can run over either transport; plus what only this transport has: raw bytes
(``send_bytes``), half-close (``done_writing``), and every line the broker wrote (``lines``),
each checked to be a JSON object.

``connect`` opens one client on a broker started with ``jsonl_flags(path)``; ``wait_end``
returns once the broker has closed the connection."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from harness import WAIT, is_turn_completed

JSONL_NAME = "broker.sock"  # as the companion names its socket in its own directory


def jsonl_flags(path: str) -> list[str]:
    return ["--jsonl-endpoint", f"unix:{path}"]


def jsonl_path(directory: str) -> str:
    return os.path.join(directory, JSONL_NAME)


def connect_only(path: str, timeout: float = 5.0) -> bytes:
    """The companion's readiness check: connect, half-close at once, wait for the broker to
    close; returns what the broker wrote (nothing, for a well-behaved broker)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


class JsonlClient:
    """One connection to the JSONL front end: send JSON dicts (or raw bytes), read lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.messages: list[Any] = []
        self.lines: list[bytes] = []  # every line the broker wrote, without its newline
        self.code: str | None = None  # "closed" once the broker closed the connection
        self.details: str | None = None
        self._cursor = 0
        self._ids = itertools.count(1)
        self._responses: dict[tuple[str, Any], asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, path: str) -> JsonlClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 28)
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                assert line.endswith(b"\n"), f"a last line without its newline: {line[:200]!r}"
                text = line[:-1]
                self.lines.append(text)
                msg = json.loads(text)  # the broker writes nothing but JSON lines
                assert isinstance(msg, dict), text[:200]
                self.messages.append(msg)
                if "method" not in msg and ("result" in msg or "error" in msg) and \
                        not isinstance(msg.get("id"), (dict, list, float)):
                    future = self._responses.pop(_key(msg["id"]), None)
                    if future is not None and not future.done():
                        future.set_result(msg)
                self._changed.set()
            self.code = "closed"
        except (ConnectionError, OSError) as exc:
            self.code, self.details = "reset", repr(exc)
        finally:
            self._ended.set()
            self._changed.set()
            for future in self._responses.values():
                if not future.done():
                    future.set_exception(AssertionError(f"connection ended ({self.code}: {self.details})"))

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # -- sending ------------------------------------------------------------------------
    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, msg: Any) -> None:
        text = msg if isinstance(msg, str) else json.dumps(msg)
        await self.send_bytes(text.encode("utf-8", "surrogatepass") + b"\n")

    def new_id(self) -> int:
        return next(self._ids)

    async def send_request(self, method: str, params: Any = None, *, id: Any = None) -> asyncio.Future[Any]:
        req_id = self.new_id() if id is None else id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._responses[_key(req_id)] = future
        msg: dict[str, Any] = {"id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        return future

    async def request(self, method: str, params: Any = None, *, id: Any = None, timeout: float = WAIT) -> Any:
        future = await self.send_request(method, params, id=id)
        return await asyncio.wait_for(future, timeout)

    async def result(self, method: str, params: Any = None, **kw: Any) -> Any:
        reply = await self.request(method, params, **kw)
        assert "result" in reply, reply
        return reply["result"]

    async def respond(self, req_id: Any, result: Any = None, error: Any = None) -> None:
        await self.send({"id": req_id, "error": error} if error is not None else {"id": req_id, "result": result})

    async def done_writing(self) -> None:
        """Half-closes the connection (the companion's ``end()``)."""
        if self.writer.can_write_eof():
            self.writer.write_eof()

    # -- codex conveniences ---------------------------------------------------------------
    async def initialize(self, opt_out: list[str] | None = None, name: str = "test-client") -> Any:
        caps: dict[str, Any] = {"experimentalApi": True}
        if opt_out is not None:
            caps["optOutNotificationMethods"] = opt_out
        reply = await self.request("initialize", {"clientInfo": {"name": name, "version": "0"}, "capabilities": caps})
        await self.send({"method": "initialized"})
        return reply

    async def start_thread(self) -> str:
        return (await self.result("thread/start", {"cwd": "/tmp"}))["thread"]["id"]

    async def start_turn(self, thread_id: str, text: str) -> str:
        result = await self.result("turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]})
        return result["turn"]["id"]

    async def turn_completed(self, thread_id: str, turn_id: str | None = None, timeout: float = WAIT) -> Any:
        found = await self.until(lambda m: is_turn_completed(m, thread_id, turn_id), timeout)
        return found[-1]

    # -- receiving ----------------------------------------------------------------------
    async def until(self, predicate: Callable[[Any], bool], timeout: float = WAIT) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out: list[Any] = []
        while True:
            while self._cursor < len(self.messages):
                msg = self.messages[self._cursor]
                self._cursor += 1
                out.append(msg)
                if predicate(msg):
                    return out
            if self.ended:
                raise AssertionError(f"connection ended ({self.code}: {self.details}) before a match; "
                                     f"last messages: {out[-3:]}")
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching message within {timeout:g} s; last messages: {out[-3:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def next(self, timeout: float = WAIT) -> Any:
        return (await self.until(lambda m: True, timeout))[-1]

    async def wait_end(self, timeout: float = WAIT) -> str | None:
        """Waits until the broker closes the connection; returns "closed" (or "reset")."""
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout:g} s") from None
        return self.code

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> JsonlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _key(req_id: Any) -> tuple[str, Any]:
    return (type(req_id).__name__, req_id)
