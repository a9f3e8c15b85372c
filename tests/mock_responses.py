"""A tiny, stdlib-only mock of the OpenAI Responses API for offline ``codex app-server`` turns.

Usage::

    with MockResponses() as mock:
        env = write_codex_home(tmp_path / "codex-home", mock.base_url)
        proc = subprocess.Popen([codex, "app-server"], env={**os.environ, **env}, ...)
        ...  # drive JSON-RPC over stdio
        assert mock.requests  # JSON bodies of every POST /v1/responses, in order

Every ``POST /v1/responses`` is answered with a Server-Sent-Events stream in the shape codex
expects (the same events as codex-rs ``core_test_support::responses``)::

    response.created
    response.output_item.added      (assistant message, empty)
    response.output_text.delta  x N (one ``item/agentMessage/delta`` each on the app-server side)
    response.output_item.done       (assistant message with the full text)
    response.completed              (with usage)

Default reply (when no scripted reply is queued): take the *last user message* of the
request's ``input`` and read ``key=value`` directives from it:

* ``reply=WORD``  the text of every delta (default ``ok``), so the final assistant text is
  WORD repeated ``deltas`` times (``reply=hi deltas=3`` -> ``hihihi``).
* ``deltas=N``    number of ``response.output_text.delta`` events (default 3, at least 1).
* ``delay=S``     seconds to wait before each delta (default 0): a turn lasts about N*S s.
* ``approve=1``   the first response of the turn (no tool output after the last user
  message yet) is a shell tool call instead of text: ``exec_command`` (the tool codex
  0.169 advertises) with ``sandbox_permissions = "require_escalated"``.  Under the
  ``on-request`` approval policy with a ``read-only``/``workspace-write`` sandbox (the
  :func:`write_codex_home` defaults) codex then sends the server->client request
  ``item/commandExecution/requestApproval``.  The follow-up request, which carries the
  ``function_call_output``, gets the normal text reply.
* ``cmd=A+B``     (with ``approve=1``) the shell command, ``+`` standing for a space;
  default ``uname -s`` (no side effects).
* ``spawn=1``     the first response of the turn is a ``spawn_agent`` tool call (in the
  ``multi_agent_v1`` namespace codex 0.169 advertises), so codex spawns a sub-agent thread.
  Its task is ``sub-agent task reply=W deltas=N`` with W = ``subreply`` (default ``sub``)
  and N = ``subdeltas`` (default 2): the sub-agent's own turn gets the normal text reply.
  The follow-up request of the spawning turn gets the normal text reply. ``subapprove=1``
  adds ``approve=1`` to the task: the sub-agent's turn asks for a command approval.

Tests can also script replies: :meth:`MockResponses.enqueue_text`,
:meth:`~MockResponses.enqueue_shell_call`, :meth:`~MockResponses.enqueue_events`,
:meth:`~MockResponses.enqueue_error` or :meth:`~MockResponses.enqueue` (a :class:`Reply` or a
callable ``body -> Reply``).  Queued replies are used FIFO, one per request, before the
default behaviour applies.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "MOCK_MODEL",
    "MockResponses",
    "Observed",
    "Reply",
    "expected_text",
    "last_user_text",
    "parse_directives",
    "write_codex_home",
]

MOCK_MODEL = "mock-model"
DEFAULT_APPROVAL_COMMAND = "uname -s"

_DIRECTIVE_RE = re.compile(r"(?<![\w=])([A-Za-z_]+)=(\S+)")

Event = dict[str, Any]


# ----------------------------------------------------------------------------------------
# Directives
# ----------------------------------------------------------------------------------------


def parse_directives(text: str) -> dict[str, str]:
    """The ``key=value`` directives in ``text`` (keys lower-cased; the last one wins)."""
    return {k.lower(): v for k, v in _DIRECTIVE_RE.findall(text)}


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


def _text_plan(user_text: str) -> tuple[str, int, float]:
    d = parse_directives(user_text)
    return d.get("reply", "ok"), max(1, _int(d.get("deltas"), 3)), max(0.0, _float(d.get("delay"), 0.0))


def expected_text(user_text: str) -> str:
    """The final assistant text the default reply produces for a user message."""
    word, deltas, _ = _text_plan(user_text)
    return word * deltas


# ----------------------------------------------------------------------------------------
# SSE events (same shapes as codex-rs core_test_support::responses)
# ----------------------------------------------------------------------------------------


def ev_response_created(response_id: str) -> Event:
    return {"type": "response.created", "response": {"id": response_id}}


def ev_completed(response_id: str, input_tokens: int = 10, output_tokens: int = 5) -> Event:
    return {
        "type": "response.completed",
        "response": {
            "id": response_id,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": None,
                "output_tokens": output_tokens,
                "output_tokens_details": None,
                "total_tokens": input_tokens + output_tokens,
            },
        },
    }


def ev_message_added(item_id: str) -> Event:
    return {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": {"type": "message", "role": "assistant", "id": item_id, "content": []},
    }


def ev_text_delta(item_id: str, delta: str) -> Event:
    return {
        "type": "response.output_text.delta",
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": delta,
    }


def ev_message_done(item_id: str, text: str) -> Event:
    return {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": {
            "type": "message",
            "role": "assistant",
            "id": item_id,
            "content": [{"type": "output_text", "text": text}],
        },
    }


def ev_function_call(call_id: str, name: str, arguments: str) -> Event:
    return {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments},
    }


def ev_local_shell_call(call_id: str, command: list[str]) -> Event:
    return {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": {
            "type": "local_shell_call",
            "call_id": call_id,
            "status": "completed",
            "action": {"type": "exec", "command": command},
        },
    }


def sse_encode(event: Event) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


# ----------------------------------------------------------------------------------------
# Request inspection
# ----------------------------------------------------------------------------------------


def _input_items(body: Any) -> list[dict[str, Any]]:
    items = body.get("input") if isinstance(body, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _is_user_message(item: dict[str, Any]) -> bool:
    return item.get("type", "message") == "message" and item.get("role") == "user"


def _message_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(s["text"] for s in content if isinstance(s, dict) and isinstance(s.get("text"), str))


def last_user_text(body: Any) -> str:
    """Text of the last ``role == "user"`` message in a request's ``input``.

    Codex also sends context as user messages (``<environment_context>``, AGENTS.md), but
    those precede the real user message, so the last one is what the client typed.
    """
    for item in reversed(_input_items(body)):
        if _is_user_message(item):
            return _message_text(item)
    return ""


def has_tool_output_after_last_user(body: Any) -> bool:
    """True for a follow-up request: a ``*_output`` item comes after the last user message."""
    for item in reversed(_input_items(body)):
        if _is_user_message(item):
            return False
        if str(item.get("type", "")).endswith("_output"):
            return True
    return False


def tool_names(body: Any) -> list[str]:
    tools = body.get("tools") if isinstance(body, dict) else None
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict):
            name = tool.get("name") or (tool.get("function") or {}).get("name") or tool.get("type")
            if isinstance(name, str):
                names.append(name)
    return names


def _namespace_of(body: Any, function: str) -> str | None:
    """The name of the tool namespace that offers ``function``, if one does."""
    tools = body.get("tools") if isinstance(body, dict) else None
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(tool.get("name"), str):
            inner = tool.get("tools")
            if isinstance(inner, list) and any(isinstance(t, dict) and t.get("name") == function for t in inner):
                return tool["name"]
    return None


# ----------------------------------------------------------------------------------------
# Replies
# ----------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One reply: SSE ``events`` as ``(seconds_to_wait_before, event)`` pairs, or an HTTP error."""

    events: list[tuple[float, Event]] = field(default_factory=list)
    status: int = 200
    #: JSON body for a non-200 reply.
    error_body: dict[str, Any] | None = None


@dataclass
class Observed:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


ReplySource = Reply | Callable[[Any], Reply]


# ----------------------------------------------------------------------------------------
# HTTP server
# ----------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mock: MockResponses


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.mock._observe(self.command, self.path, dict(self.headers), None)
        path = self.path.split("?", 1)[0]
        if path.endswith("/models"):
            self._send_json(200, {"object": "list", "data": [], "models": []})
        else:
            self._send_json(404, {"error": {"message": f"mock: no route for GET {path}"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        mock = self.server.mock
        body = self._read_body()
        mock._observe(self.command, self.path, dict(self.headers), body)
        path = self.path.split("?", 1)[0]
        if not path.endswith("/responses"):
            self._send_json(404, {"error": {"message": f"mock: no route for POST {path}"}})
            return
        reply = mock._next_reply(body)
        if reply.status != 200:
            self._send_json(reply.status, reply.error_body or {"error": {"message": "mock error"}})
            return
        # No Content-Length: the stream ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for delay, event in reply.events:
                if delay > 0 and mock._stopping.wait(delay):
                    return
                self.wfile.write(sse_encode(event))
                self.wfile.flush()
        except OSError:
            # codex went away mid-stream (turn interrupted, process killed, ...).
            mock._note_disconnect()


class MockResponses:
    """Local Responses-API mock on 127.0.0.1 (background thread); see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._cond = threading.Condition()
        self._queue: deque[ReplySource] = deque()
        self._counter = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: JSON bodies of every ``POST .../responses``, in arrival order.
        self.requests: list[Any] = []
        #: Every HTTP request (method, path, headers, body), for debugging.
        self.observed: list[Observed] = []
        #: SSE streams the client dropped before the end (noticed on the next write).
        self.disconnects = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> MockResponses:
        if self._server is None:
            self._stopping.clear()
            server = _Server((self._host, self._port), _Handler)
            server.mock = self
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="mock-responses", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes streams sleeping between deltas
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MockResponses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("MockResponses is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """For ``[model_providers.mock] base_url``; ends in ``/v1``."""
        return f"http://{self._host}:{self.port}/v1"

    # -- scripting -----------------------------------------------------------------------

    def enqueue(self, reply: ReplySource) -> None:
        """Queue a :class:`Reply` (or a callable ``body -> Reply``) for the next request."""
        with self._cond:
            self._queue.append(reply)

    def enqueue_events(self, events: Iterable[Event], delay: float = 0.0) -> None:
        """Queue raw SSE events, each preceded by ``delay`` seconds."""
        self.enqueue(Reply(events=[(delay, e) for e in events]))

    def enqueue_text(self, text: str, deltas: int = 3, delay: float = 0.0) -> None:
        """Queue an assistant message streamed as ``text`` cut into ``deltas`` pieces."""
        pieces = _split(text, max(1, deltas))
        self.enqueue(lambda body: self.text_reply(pieces, delay))

    def enqueue_shell_call(self, command: str = DEFAULT_APPROVAL_COMMAND, escalate: bool = True) -> None:
        """Queue a shell tool call (needs approval under ``on-request`` when ``escalate``)."""
        self.enqueue(lambda body: self.shell_call_reply(body, command, escalate))

    def enqueue_error(self, status: int = 500, message: str = "mock failure") -> None:
        """Queue an HTTP error (codex fails the turn: ``request_max_retries = 0``)."""
        self.enqueue(Reply(status=status, error_body={"error": {"message": message, "type": "mock_error"}}))

    # -- observation ---------------------------------------------------------------------

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> list[Any]:
        """Block until at least ``count`` ``POST /responses`` bodies arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"mock got {len(self.requests)} requests, wanted {count}")
                self._cond.wait(remaining)
            return list(self.requests)

    # -- reply builders ------------------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        with self._cond:
            self._counter += 1
            return f"{prefix}_mock_{self._counter}"

    def text_reply(self, pieces: list[str], delay: float = 0.0) -> Reply:
        resp_id, msg_id = self._next_id("resp"), self._next_id("msg")
        events: list[tuple[float, Event]] = [(0.0, ev_response_created(resp_id)), (0.0, ev_message_added(msg_id))]
        events += [(delay, ev_text_delta(msg_id, p)) for p in pieces]
        events += [(0.0, ev_message_done(msg_id, "".join(pieces))), (0.0, ev_completed(resp_id))]
        return Reply(events=events)

    def shell_call_reply(self, body: Any, command: str, escalate: bool = True) -> Reply:
        """A tool call running ``command`` through whichever shell tool the request offers."""
        resp_id, call_id = self._next_id("resp"), self._next_id("call")
        names = tool_names(body)
        extra: dict[str, str] = (
            {"sandbox_permissions": "require_escalated", "justification": "mock asks for approval"} if escalate else {}
        )
        if "exec_command" in names:  # codex 0.169 default (unified exec)
            call = ev_function_call(call_id, "exec_command", json.dumps({"cmd": command, **extra}))
        elif "shell_command" in names:
            call = ev_function_call(call_id, "shell_command", json.dumps({"command": command, **extra}))
        elif "shell" in names:
            args = {"command": ["bash", "-lc", command], **extra}
            call = ev_function_call(call_id, "shell", json.dumps(args))
        else:
            call = ev_local_shell_call(call_id, ["bash", "-lc", command])
        return Reply(events=[(0.0, ev_response_created(resp_id)), (0.0, call), (0.0, ev_completed(resp_id))])

    def spawn_agent_reply(self, body: Any, task: str) -> Reply:
        """A ``spawn_agent`` call with ``task`` as the sub-agent's message, in the namespace
        the request offers it in (codex 0.169: ``multi_agent_v1``)."""
        resp_id, call_id = self._next_id("resp"), self._next_id("call")
        call = ev_function_call(call_id, "spawn_agent", json.dumps({"message": task}))
        namespace = _namespace_of(body, "spawn_agent")
        if namespace is not None:
            call["item"]["namespace"] = namespace
        return Reply(events=[(0.0, ev_response_created(resp_id)), (0.0, call), (0.0, ev_completed(resp_id))])

    def default_reply(self, body: Any) -> Reply:
        text = last_user_text(body)
        d = parse_directives(text)
        if d.get("approve") == "1" and not has_tool_output_after_last_user(body):
            return self.shell_call_reply(body, d.get("cmd", DEFAULT_APPROVAL_COMMAND).replace("+", " "))
        if d.get("spawn") == "1" and not has_tool_output_after_last_user(body):
            task = f"sub-agent task reply={d.get('subreply', 'sub')} deltas={_int(d.get('subdeltas'), 2)}"
            if d.get("subapprove") == "1":
                task += " approve=1"
            return self.spawn_agent_reply(body, task)
        word, deltas, delay = _text_plan(text)
        return self.text_reply([word] * deltas, delay)

    # -- internals -----------------------------------------------------------------------

    def _observe(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        with self._cond:
            self.observed.append(Observed(method, path, headers, body))
            if method == "POST" and path.split("?", 1)[0].endswith("/responses"):
                self.requests.append(body)
            self._cond.notify_all()

    def _note_disconnect(self) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _next_reply(self, body: Any) -> Reply:
        with self._cond:
            scripted = self._queue.popleft() if self._queue else None
        if scripted is None:
            return self.default_reply(body)
        return scripted(body) if callable(scripted) else scripted


def _split(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    step, extra = divmod(len(text), n)
    out, pos = [], 0
    for i in range(n):
        size = step + (1 if i < extra else 0)
        out.append(text[pos : pos + size])
        pos += size
    return out


# ----------------------------------------------------------------------------------------
# CODEX_HOME
# ----------------------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def write_codex_home(
    path: str | Path,
    base_url: str,
    approval_policy: str = "on-request",
    sandbox_mode: str = "read-only",
    model: str = MOCK_MODEL,
    extra_toml: str = "",
) -> dict[str, str]:
    """Write ``config.toml`` for an offline codex that uses the mock; return env overrides.

    * ``approval_policy``: ``on-request`` (default; needed for the ``approve=1`` flow),
      ``never`` or ``on-failure``.  ``untrusted`` makes codex 0.169 exit at startup
      ("approval_policy = \"untrusted\" is no longer supported").
    * ``sandbox_mode``: ``read-only`` (default) / ``workspace-write`` make escalated
      commands ask for approval; under ``danger-full-access`` nothing asks.
    * ``extra_toml``: top-level keys, inserted before the first table.

    No API key is needed (``requires_openai_auth = false``, no ``env_key``) and no
    ``Authorization`` header is sent, even if ``OPENAI_API_KEY`` is set.  The config passes
    ``codex app-server --strict-config``.
    """
    home = Path(path)
    home.mkdir(parents=True, exist_ok=True)
    config = f"""\
# Written by tests/mock_responses.py: codex talking to a local Responses API mock, offline.
{extra_toml}
model = {_toml_str(model)}
model_provider = "mock"
approval_policy = {_toml_str(approval_policy)}
sandbox_mode = {_toml_str(sandbox_mode)}
check_for_update_on_startup = false
web_search = "disabled"

[model_providers.mock]
name = "mock"
base_url = {_toml_str(base_url)}
wire_api = "responses"
supports_websockets = false
requires_openai_auth = false
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 300000

[features]
# These try github.com / chatgpt.com at startup (curated plugin sync).
plugins = false
remote_plugin = false
apps = false
# On by default: an unreachable base_url makes a turn retry forever ("Reconnecting...
# waiting for network"); off, the turn fails at once.
unbounded_connection_retries = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
"""
    (home / "config.toml").write_text(config)
    return {"CODEX_HOME": str(home)}
