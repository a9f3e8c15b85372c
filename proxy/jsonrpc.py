"""JSON-RPC vocabulary of the proxy: the error codes it answers with (in one table), the
methods it treats specially, the codec of the messages it relays, and lossless encode/decode.

Relayed messages are envelopes: a message's top-level members kept as their JSON text
(``msgspec.Raw``), validated and compacted by msgspec, and written back with the broker's own
id. Nothing inside ``params`` or ``result`` is decoded to Python objects, so numbers of any size
or precision, escapes and spelling pass through exactly, and a many-MB message costs a few C
passes over its bytes (no per-number work, no object per value). The routing fields (method,
id, ``params.threadId``, the thread and turn ids of a result) are decoded from their own spans.

A client message is refused before it is relayed (``read_client_message``) if it is not UTF-8,
not JSON, nested deeper than the app-server accepts (codex's JSON parser stops at 128 levels
and drops such a line without answering), or not an object; the depth check is a scan, no
recursion. Every line the broker writes to the app-server is msgspec's or orjson's rendering,
so it holds no newline: one line, one message.

``loads``/``dumps`` decode and encode whole values losslessly: orjson, falling back to the
standard library for what orjson would change (integers wider than 64 bits, numbers a double
cannot hold). NaN and Infinity are not JSON."""
from __future__ import annotations

import enum
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple, TypeGuard

import msgspec
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


# The deepest nesting the app-server parses: serde_json's limit of 128 levels, the message's own
# object included, is reached at the 128th level.
MAX_DEPTH = 127


class DecodeError(ValueError):
    """Text that is not JSON (answered with -32700)."""


class InvalidMessage(ValueError):
    """JSON the proxy will not relay: not an object, or nested too deeply (answered with -32600)."""


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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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
    if isinstance(obj, msgspec.Raw):  # a member of an envelope: already JSON text
        return orjson.Fragment(bytes(obj))
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
    if isinstance(params, msgspec.Raw):
        return params_thread_and_turn(params)[0]
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


# -- envelopes -------------------------------------------------------------------------------
Members = dict[str, msgspec.Raw]  # a message's top-level members, each as its JSON text
_MEMBERS = msgspec.json.Decoder(Members)
_RAW = msgspec.json.Decoder(msgspec.Raw)
_encode_members = msgspec.json.Encoder().encode
_NONE = msgspec.Raw(b"")  # a member that is absent


class _Params(msgspec.Struct):
    """What routing reads in a request's or a notification's params."""
    threadId: msgspec.Raw = _NONE  # noqa: N815 (the protocol's name)
    turn: msgspec.Raw = _NONE


class _Result(msgspec.Struct):
    """What routing reads in a response's result."""
    thread: msgspec.Raw = _NONE
    threadId: msgspec.Raw = _NONE  # noqa: N815
    reviewThreadId: msgspec.Raw = _NONE  # noqa: N815
    turn: msgspec.Raw = _NONE


class _WithId(msgspec.Struct):
    id: msgspec.Raw = _NONE


class _Error(msgspec.Struct):
    code: Any
    message: Any


_PARAMS = msgspec.json.Decoder(_Params)
_RESULT = msgspec.json.Decoder(_Result)
_WITH_ID = msgspec.json.Decoder(_WithId)
_ERROR = msgspec.json.Decoder(_Error)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))
_INT64 = range(-(2**63), 2**63)


def _too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests deeper than ``limit``, without recursion. Nearly every message
    has at most ``limit`` brackets in all, which a few memchr scans tell; otherwise strings are
    dropped and the running depth of the brackets is followed in C."""
    if len(data) < 1 << 16:  # a small message: two counts in C say it (strings' brackets count too)
        if data.count(b"{") + data.count(b"[") <= limit:
            return False
    elif not _more_than(data, (b"[", b"{"), limit):
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


def _more_than(data: bytes, needles: tuple[bytes, ...], limit: int) -> bool:
    """Whether ``needles`` occur more than ``limit`` times in all (stops counting there)."""
    seen = 0
    for needle in needles:
        pos = data.find(needle)
        while pos >= 0:
            seen += 1
            if seen > limit:
                return True
            pos = data.find(needle, pos + 1)
    return False


def _check_utf8(data: bytes) -> None:
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _kind(compact: bytes) -> str:
    """What a JSON text that is not an object is, in Python's words (the proxy's errors say so)."""
    first = compact[:1]
    if first == b"[":
        return "a batch (array)"
    if first == b'"':
        return "str"
    if first == b"n":
        return "NoneType"
    if first in (b"t", b"f"):
        return "bool"
    return "float" if any(c in compact for c in b".eE") else "int"


def envelope(data: bytes, *, check_depth: bool = True) -> Members:
    """A message's members, validated (UTF-8, JSON, an object, and unless told otherwise its
    depth). Text that spans lines (pretty-printed JSON) is compacted first: a member's text
    never holds a line break."""
    _check_utf8(data)
    if check_depth and _too_deep(data):
        raise InvalidMessage(f"Invalid request: nested deeper than {MAX_DEPTH} levels")
    compacted = data
    try:
        if b"\n" in data or b"\r" in data:
            compacted = msgspec.json.format(data, indent=-1)
        return _MEMBERS.decode(compacted)
    except msgspec.ValidationError:
        raise InvalidMessage(f"Invalid request: expected a JSON object, got {_kind(compacted)}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(str(exc)) from None


def encode(members: Mapping[str, Any]) -> bytes:
    """An envelope (values JSON text or encodable values) as one line of compact JSON."""
    return _encode_members(members)


def _first(raw: msgspec.Raw) -> int:
    """The first byte of a member's text (which kind of JSON value it is); -1 if empty."""
    return memoryview(raw)[0] if len(raw) else -1


_QUOTE, _BRACE = ord('"'), ord("{")
_ID_STARTS = frozenset(b'"-0123456789')
_STR = msgspec.json.Decoder(str)
_ID = msgspec.json.Decoder(str | int)  # integers of any width


def value(raw: msgspec.Raw | None) -> Any:
    """A member's value, decoded losslessly (for the small ones: ids, errors, init params)."""
    if raw is None or not raw:
        return None
    return loads(bytes(raw))


def text(raw: msgspec.Raw | None) -> str | None:
    """A member's value if it is a JSON string, else None."""
    if raw is None or _first(raw) != _QUOTE:
        return None
    try:
        return _STR.decode(raw)
    except msgspec.MsgspecError:
        return None


def request_id(raw: msgspec.Raw | None) -> msgspec.Raw | None:
    """The id as written if it is a valid request id (a string or an integer), else None."""
    if raw is None or _first(raw) not in _ID_STARTS:
        return None
    try:
        _ID.decode(raw)
    except (msgspec.MsgspecError, ValueError):  # a float; an integer over Python's 4300 digits
        return None
    return raw


def params_thread_and_turn(raw: msgspec.Raw | None) -> tuple[str | None, str | None]:
    """``params.threadId`` and ``params.turn.id``, when they are non-empty strings."""
    if raw is None or _first(raw) != _BRACE:
        return None, None
    try:
        params = _PARAMS.decode(raw)
    except msgspec.MsgspecError:
        return None, None
    return text(params.threadId) or None, _id_text(params.turn)


def _id_text(raw: msgspec.Raw) -> str | None:
    if _first(raw) != _BRACE:
        return None
    try:
        return text(_WITH_ID.decode(raw).id)
    except msgspec.MsgspecError:
        return None


def result_ids(raw: msgspec.Raw | None) -> tuple[list[str], str | None, str | None]:
    """What a result tells routing: the thread ids it hands over (thread.id, threadId,
    reviewThreadId), its ``reviewThreadId``, and its ``turn.id``."""
    if raw is None or _first(raw) != _BRACE:
        return [], None, None
    try:
        result = _RESULT.decode(raw)
    except msgspec.MsgspecError:
        return [], None, None
    review = text(result.reviewThreadId)
    found = [t for t in (_id_text(result.thread), text(result.threadId), review) if t is not None]
    return found, review, _id_text(result.turn)


def error_problem(raw: msgspec.Raw) -> str | None:
    """Why an ``error`` member is not a JSON-RPC error the app-server can read (an object with
    an integer code that fits 64 bits and a string message), or None."""
    try:
        err = _ERROR.decode(raw)
    except msgspec.MsgspecError:
        return "error is not an object with a code and a message"
    if type(err.code) is not int or err.code not in _INT64:
        return "error.code is not a 64-bit integer"
    if type(err.message) is not str:
        return "error.message is not a string"
    return None


# -- client messages -------------------------------------------------------------------------
class Kind(enum.Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    ANSWER = "answer"  # an answer to a server request (result or error, no method)
    INVALID = "invalid"  # an object the proxy answers with -32600 (``problem`` says why)


@dataclass(frozen=True, slots=True)
class ClientMessage:
    """One client message, read: what routing needs, and the members to relay."""
    kind: Kind
    members: Members
    method: str | None = None
    id: msgspec.Raw | None = None  # the id as written, when it is a valid request id
    thread_id: str | None = None  # params.threadId of a request
    problem: str | None = None  # INVALID: the error message; ANSWER: why it cannot be relayed as is


@dataclass(frozen=True, slots=True)
class Refusal:
    """A client message refused before routing: the error it gets (with ``"id": null``)."""
    error: dict[str, Any]


def read_client_message(data: bytes) -> ClientMessage | Refusal:
    """Validates and classifies one client message; never raises for bad input. A few C passes
    over the bytes (~4 ms per MB in all): a 64 MiB message holds the loop well under a second,
    and builds no object per value."""
    try:
        members = envelope(data)
    except DecodeError as exc:
        return Refusal(error(PARSE_ERROR, f"Parse error: {exc}"))
    except InvalidMessage as exc:
        return Refusal(error(INVALID_REQUEST, str(exc)))
    method_raw = members.get("method")
    req_id = request_id(members.get("id"))
    if method_raw is None and "id" in members and ("result" in members or "error" in members):
        return ClientMessage(Kind.ANSWER, members, id=req_id, problem=_answer_problem(members))
    method = text(method_raw)
    if not method:
        return ClientMessage(Kind.INVALID, members, id=req_id,
                             problem="Invalid request: missing or non-string method")
    if "id" not in members:
        return ClientMessage(Kind.NOTIFICATION, members, method=method)
    if req_id is None:
        return ClientMessage(Kind.INVALID, members, problem="Invalid request: id must be a string or an integer")
    thread_id, _ = params_thread_and_turn(members.get("params"))
    return ClientMessage(Kind.REQUEST, members, method=method, id=req_id, thread_id=thread_id)


def _answer_problem(members: Members) -> str | None:
    if "result" in members and "error" in members:
        return "it has both a result and an error"
    if "error" in members:
        return error_problem(members["error"])
    return None


def read_params(data: bytes) -> msgspec.Raw | Refusal:
    """A Call's ``params_json``: one JSON value, validated and compacted (empty means {})."""
    if not data:
        return msgspec.Raw(b"{}")
    try:
        _check_utf8(data)
        if _too_deep(data, MAX_DEPTH - 1):  # it goes inside the request's own object
            return Refusal(error(INVALID_REQUEST, f"Invalid request: params nested deeper than {MAX_DEPTH - 1} levels"))
        if b"\n" in data or b"\r" in data:
            return msgspec.Raw(msgspec.json.format(data, indent=-1))
        return _RAW.decode(data)  # validated, kept as written
    except (DecodeError, msgspec.DecodeError, RecursionError) as exc:
        return Refusal(error(PARSE_ERROR, f"Parse error in params_json: {exc}"))


# -- sub-agent lineage ------------------------------------------------------------------------
# Notifications that can tell which thread spawned another (the hub reads them off its hot path).
LINEAGE_METHODS = frozenset({"thread/started", "item/started", "item/completed"})
# collabAgentToolCall tools whose receivers are the sender's own sub-agents (a missing tool is
# read as a spawn). Other tools (sendInput, wait, closeAgent...) address threads that may be
# anyone's: their receivers are claimed only when no Session follows them and no link names
# them yet (the hub decides; some clients, the companion's fake codex among them, name a
# sub-agent only in a wait).
_ADOPTING_TOOLS = frozenset({"spawnAgent", "resumeAgent"})


class Link(NamedTuple):
    """A sub-agent thread and the thread that spawned it. ``claimed``: the link is certain (a
    spawn, or a parent codex names); otherwise it holds only for a thread nobody follows."""

    child: str
    parent: str
    claimed: bool = True


def spawned_threads(method: str, params: Any) -> list[Link]:
    """(sub-agent thread, the thread that spawned it) pairs a notification names, decoded:
    ``thread/started`` whose thread names its parent (``parentThreadId``, or
    ``source.subAgent.thread_spawn.parent_thread_id``), and a ``collabAgentToolCall`` item
    that spawns (``senderThreadId`` -> each of ``receiverThreadIds``). Pure; [] for anything
    else or anything malformed."""
    if type(params) is not dict:
        return []
    if method == "thread/started":
        thread = params.get("thread")
        if not isinstance(thread, dict):
            return []
        child, parent = thread.get("id"), _parent_of(thread)
        return [Link(child, parent)] if _name(child) and parent is not None and parent != child else []
    if method not in LINEAGE_METHODS:
        return []
    item = params.get("item")
    if not isinstance(item, dict) or item.get("type") != "collabAgentToolCall":
        return []
    tool, sender, receivers = item.get("tool"), item.get("senderThreadId"), item.get("receiverThreadIds")
    if not _name(sender) or not isinstance(receivers, list):
        return []
    claimed = tool is None or tool in _ADOPTING_TOOLS
    return [Link(r, sender, claimed) for r in receivers if _name(r) and r != sender]


def _name(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value)


def _parent_of(thread: dict[str, Any]) -> str | None:
    parent = thread.get("parentThreadId")
    if _name(parent):
        return parent
    source = thread.get("source")
    sub = source.get("subAgent") if isinstance(source, dict) else None
    spawn = sub.get("thread_spawn") if isinstance(sub, dict) else None
    parent = spawn.get("parent_thread_id") if isinstance(spawn, dict) else None
    return parent if _name(parent) else None


class _LineageThread(msgspec.Struct):
    id: Any = None
    parentThreadId: Any = None  # noqa: N815
    source: Any = None


class _LineageItem(msgspec.Struct):
    type: Any = None
    tool: Any = None
    senderThreadId: Any = None  # noqa: N815
    receiverThreadIds: Any = None  # noqa: N815


class _LineageParams(msgspec.Struct):
    thread: _LineageThread | None = None
    item: _LineageItem | None = None


_LINEAGE = msgspec.json.Decoder(_LineageParams)


def spawned_threads_raw(method: str, raw: msgspec.Raw | None) -> list[Link]:
    """``spawned_threads`` of a notification routed from its envelope: only the few fields it
    reads are decoded (a big item's other members are skipped in C)."""
    if method not in LINEAGE_METHODS or raw is None or _first(raw) != _BRACE:
        return []
    try:
        params = _LINEAGE.decode(raw)
    except msgspec.MsgspecError:
        return []
    decoded = {key: msgspec.structs.asdict(part) for key, part in
               (("thread", params.thread), ("item", params.item)) if part is not None}
    return spawned_threads(method, decoded)
