"""JSON-RPC vocabulary of the proxy: the error codes it answers with (in one table), the
methods it treats specially, and lossless encode/decode.

Decoding uses orjson and falls back to the standard library for what orjson would change
(integers wider than 64 bits, numbers a double cannot hold), so any message a client or the
app-server can write passes through unchanged in meaning. NaN and Infinity are not JSON."""
from __future__ import annotations

import json
import math
from decimal import Decimal
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


class RawNumber:
    """A JSON number a double cannot hold exactly (1e400, 1.0000000000000000000001), kept as
    its text so that it passes through unchanged."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"RawNumber({self.text})"


# orjson turns an integer beyond 64 bits into a float and rounds every number to a double, so
# text that may hold such a number (a run of 16+ digits, a 3-digit exponent) is decoded by the
# standard library instead, keeping what a double would change as a RawNumber.
# (bytes.translate + find: a regex would cost ~16 ns per byte of a many-MB result.)
_FOLD = bytes.maketrans(b"0123456789.E-", b"00000000000e+")


def _suspect(data: bytes | str) -> bool:
    folded = (data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data).translate(_FOLD)
    return b"0" * 16 in folded or b"0e000" in folded or b"0e+000" in folded


def loads(data: bytes | str) -> Any:
    """Lossless decode: numbers of any size or precision stay exact."""
    return _loads_exact(data) if _suspect(data) else loads_for_routing(data)


def loads_for_routing(data: bytes | str) -> Any:
    """Fast decode for reading routing fields only: numbers may come back rounded. Re-decode
    with ``exact`` before re-encoding the message."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return _loads_exact(data, exc)


def exact(data: bytes | str, decoded: Any) -> Any:
    """``decoded`` (from ``loads_for_routing(data)``), decoded again losslessly if it has to be."""
    return _loads_exact(data) if _suspect(data) else decoded


def loads_lenient(data: bytes | str) -> Any:
    """Whatever the standard library accepts (NaN too): only to salvage an id from a bad line."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(str(exc)) from None


def _number(text: str) -> float | RawNumber:
    value = float(text)
    if math.isfinite(value) and Decimal(repr(value)) == Decimal(text):
        return value
    return RawNumber(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_exact(data: bytes | str, orjson_error: Exception | None = None) -> Any:
    try:
        if isinstance(data, bytes):  # UTF-8 only: what passes on unchanged must be UTF-8
            data = data.decode("utf-8")
        return json.loads(data, parse_float=_number, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(str(orjson_error or exc)) from None


def dumps(obj: Any) -> bytes:
    """UTF-8 JSON text: what goes on the app-server's stdin and into ServerFrames."""
    try:
        return orjson.dumps(obj, default=_fragment)
    except TypeError:  # an integer wider than 64 bits, or a lone surrogate
        pass
    try:
        return orjson.dumps(_wide_ints(obj), default=_fragment)
    except TypeError:  # a lone surrogate: only a \u escape carries it
        return json.dumps(obj, separators=(",", ":"), default=lambda o: float(o.text)).encode()


def _fragment(obj: Any) -> Any:
    if isinstance(obj, RawNumber):
        return orjson.Fragment(obj.text)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _wide_ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {key: _wide_ints(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_wide_ints(value) for value in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
        return orjson.Fragment(str(obj))
    return obj


def dumps_text(obj: Any) -> str:
    return dumps(obj).decode()


def error_response(req_id: Any, error: dict[str, Any]) -> bytes:
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
