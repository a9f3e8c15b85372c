"""JSON-RPC vocabulary of the proxy: the error codes it answers with (in one table), the
methods it treats specially, and lossless encode/decode.

Decoding uses orjson and falls back to the standard library for what orjson refuses but JSON
allows (integers wider than 64 bits), so any message a client or the app-server can write
passes through unchanged in meaning."""
from __future__ import annotations

import json
from typing import Any

import orjson

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
NO_CLIENT_ANSWERED = -32000
OVERLOADED = -32001
APP_SERVER_EXITED = -32002

DRAINING_ERROR: dict[str, Any] = {
    "code": INVALID_REQUEST,
    "message": "Server is draining; retry after reconnecting",
    "data": {"reason": "serverShuttingDown"},
}
OVERLOADED_ERROR: dict[str, Any] = {"code": OVERLOADED, "message": "Server overloaded; retry later."}
NO_CLIENT_ERROR: dict[str, Any] = {"code": NO_CLIENT_ANSWERED, "message": "no client answered this request"}
ALREADY_INITIALIZED_ERROR: dict[str, Any] = {"code": INVALID_REQUEST, "message": "Already initialized"}

# Requests that start new work; refused while the broker drains.
NEW_WORK_METHODS = frozenset({
    "thread/start", "thread/resume", "thread/fork", "turn/start", "review/start", "thread/compact/start",
})
# Requests whose success begins a turn (tracked as in-flight work until turn/completed).
TURN_STARTING_METHODS = frozenset({"turn/start", "review/start", "thread/compact/start"})


class DecodeError(ValueError):
    """Text that is not JSON."""


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise DecodeError(str(exc)) from None


def dumps(obj: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # an integer wider than 64 bits
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_response(req_id: Any, error: dict[str, Any]) -> str:
    return dumps({"id": req_id, "error": error})


def error(code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return err


def is_request_id(value: Any) -> bool:
    """JSON-RPC ids the proxy maps: strings and integers (not booleans, null or floats)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def thread_id_of(params: Any) -> str | None:
    if isinstance(params, dict):
        tid = params.get("threadId")
        if isinstance(tid, str) and tid:
            return tid
    return None


def thread_ids_in_result(result: Any) -> list[str]:
    """Thread ids a result hands to its requester: thread.id, threadId, reviewThreadId."""
    if not isinstance(result, dict):
        return []
    found = []
    thread = result.get("thread")
    if isinstance(thread, dict) and isinstance(thread.get("id"), str):
        found.append(thread["id"])
    for key in ("threadId", "reviewThreadId"):
        if isinstance(result.get(key), str):
            found.append(result[key])
    return found
