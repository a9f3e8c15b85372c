#!/usr/bin/env python3
"""Deterministic, fast fake of `codex app-server` (JSONL JSON-RPC on stdio), with misbehaviours.

Standalone: stdlib only, python >= 3.11. Run it as `python tests/fake_app_server.py [options]`;
unknown arguments are ignored (so `... app-server --listen stdio://` works too).

Wire format
-----------
One JSON object per line. Requests {id, method, params}; responses {id, result} or
{id, error: {code, message}}; notifications {method, params} (no id). Output is UTF-8
(non-ASCII unescaped). A line that is not JSON (or not UTF-8, or uses NaN/Infinity) gets
{"id": null, "error": {"code": -32700}}; blank lines and non-object JSON are ignored; a
message without method and id is ignored. Unknown method -> -32601; params of the wrong type
-> -32602. Requests are handled concurrently: a streaming turn or a slow request never blocks
other requests.

Initialization (strict by default, like the real server)
-------------------------------------------------------
`initialize` -> {userAgent}. Any other request before it -> -32600 "Not initialized"; a
second `initialize` -> -32600 "Already initialized". The `initialized` notification is
accepted and ignored. `--lenient-initialize` (or FAKE_STRICT_INIT=0) turns the checks off
(`--strict-initialize` is accepted and is the default).
optOutNotificationMethods (initialize params.capabilities) are honoured by default: those
notification methods are never sent. FAKE_HONOR_OPTOUT=0 turns that off.

Base methods
------------
initialize, account/read, config/read,
thread/start {cwd?} -> {thread: {id, preview, cwd}, model}, then notification thread/started.
thread/read {threadId, includeTurns?} -> {thread: {id, preview, cwd, turns}}: turns
    ([{id, status, items}], the agent message text cut at 64 KiB) only with includeTurns;
    an unknown thread -> -32600.
thread/loaded/list -> {data: [thread ids], nextCursor: null} (never delayed).
turn/start {threadId, input} -> {turn: {id, status: "inProgress", items: []}}, then the turn
    stream (below). An unknown threadId is accepted (the thread is created).
turn/interrupt {threadId, turnId} -> {} and the turn ends with status "interrupted";
    no such running turn -> -32600.
fake/stats -> {serverRequests, serverResponses, serverErrorResponses, pendingServerRequests,
    unexpectedResponses, turnsRunning, droppedLines}. A response whose id is not a pending server request
    (a second answer, a made-up id) counts in unexpectedResponses (and is logged to stderr).

The turn stream: turn/started, item/started, N x item/agentMessage/delta ("w0 ", "w1 ", ...),
item/completed (the full text), turn/completed (status "completed" or "interrupted").
Every one carries params.threadId (turn/* have params.turn.id, the others params.turnId).

Turn switches: words in the turn's input text (turn/start input items' text)
------------------------------------------------------------------------------
  deltas=N    N deltas (default env FAKE_DELTAS, else 20).
  seconds=S   total turn duration; deltas paced evenly over S (default env FAKE_TURN_SECONDS,
              else 0 = as fast as the reader drains them, written in batches of 64).
  approve=1   after item/started, send the server->client request
              item/commandExecution/requestApproval {threadId, turnId, itemId, command, cwd}
              and wait for its response (as long as it takes); the first delta is then
              "decision=D " (D = result.decision, or "decline" for an error response or no
              decision), then the N deltas (paced over S from that moment).
  crash=K     after K deltas (K capped at N; crash=0: right after item/started), flush stdout
              (bounded, 5 s), write "fake app-server: crashing mid-turn" to stderr and
              os._exit(3).
  hang=1      right after turn/started (flushed), the process wedges: it stops reading stdin,
              answering and emitting anything (the loop thread sleeps forever). It writes
              "fake app-server: hanging" to stderr first. SIGTERM/SIGINT still exit 0 at once.
  hang=2      as hang=1, but SIGTERM and SIGINT are ignored too (only SIGKILL ends it).
  linger=S    once interrupted, the turn takes S more seconds before its turn/completed
              ("interrupted"), as codex does while it winds a running tool call down.
  chunk=1     the turn/start response and ALL the turn's notifications (turn/started,
              item/started, deltas, item/completed, turn/completed) are written in ONE write
              call (one os.write when the pipe has room and nothing else is queued), to check
              that a proxy keeps order within a chunk. seconds/approve/crash/hang are ignored.

  subagents=N the turn spawns a chain of N nested sub-agents, in the order codex writes it: the
              first sub-agent's thread/started {thread: {id, agentNickname: "Scout-1", name}}
              (no parent field), then the turn's own turn/started, then on the spawning thread
              item/started {item: {type: "collabAgentToolCall", tool: "spawnAgent", senderThreadId,
              receiverThreadIds: [child], ...}}, then the sub-agent's turn on its own thread id
              (turn/started, [the next sub-agent's thread/started and collab item, its turn],
              item/started, subdeltas=K deltas "s0 ".. (default 3), item/completed,
              turn/completed), then item/completed of the collab item on the spawning thread;
              then the parent's own item/started, deltas... as usual.
  subparent=1 each sub-agent's thread/started names its parent as codex 0.169 does
              (thread.parentThreadId and source.subAgent.thread_spawn.parent_thread_id).
  subapprove=1 the deepest sub-agent asks item/commandExecution/requestApproval on its own
              thread before its deltas (its first delta is then "decision=D ").

Server->client request ids are integers counting from 0 (a client that tests an id for
truthiness is caught).

Review and compaction
---------------------
review/start {threadId, target?, delivery?} -> {turn: {id, status: "inProgress", items: []},
    reviewThreadId}. reviewThreadId is a NEW thread id (unless delivery == "inline": then the
    same threadId). After the response: thread/started for the new review thread, then the
    turn stream runs on the review thread (notifications carry threadId = reviewThreadId).
    Turn switches are read from any strings inside `target` (e.g. target.instructions).
thread/compact/start {threadId} -> {} (no turn id!), then a short turn on that threadId:
    turn/started, item/started {type: "contextCompaction"}, item/completed, turn/completed.
Both require threadId (else -32602).

Misbehaviour methods
--------------------
fake/garbage {kind}  first writes one bad line to stdout, then answers {"ok": true}. kind:
    "json"  -> `this is not json{`
    "utf8"  -> b'{"method":"x","params":{"t":"\\xff\\xfe"}}' (invalid UTF-8)
    "array" -> `[1,2,3]`
    "empty" -> an empty line
    "noid"  -> `{"result": 1}` (a response without id)
    unknown kind -> -32602.
fake/big {bytes: N}         answers {"data": "x" * N} as one line (e.g. N = 20 MB).
fake/notify {count: N, threadId?}  answers {}, then N notifications fake/tick {i, threadId?}
                            (i from 0; threadId only if given).
fake/serverRequest {threadId?, turnId?, method?, params?}  sends a server->client request
                            (method default "item/tool/requestUserInput"; params default
                            {itemId, questions: [...]}, plus threadId/turnId if given), waits
                            for the client's response, then answers the original request
                            with {"response": <the client's whole response message>}.
fake/slow {seconds}         answers {} after that many seconds (others keep being served).
fake/exit {code}            flushes stdout (bounded), writes "fake app-server: exiting with
                            code N" to stderr and os._exit(code) without answering (default 1).
fake/hang {ignoreSignals?}  wedges at once, without answering (as hang=1; hang=2 if
                            ignoreSignals is true).
fake/echo {...}             answers {"params": <params exactly as parsed>}; ints of any size
                            and unicode round-trip exactly (floats go through Python floats;
                            lone surrogates come back \\u-escaped).
fake/stderr {text}          writes text (as is, no newline added) to stderr, answers {}.
fake/stderrFlood {seconds, lineBytes?}  writes lines of lineBytes (default 200) to stderr as
                            fast as it can for that many seconds (a thread: requests keep being
                            served), then answers {"lines": N}.
fake/closeStdout            closes its stdout without answering and keeps running (reading
                            stdin; it exits on stdin EOF or a signal as usual).
fake/spawn {seconds, orphan?, holdStdout?}  starts a process that sleeps that many seconds, in
                            a new session (setsid), with this server's own arguments on its
                            command line (so a --marker finds it); answers {"pid": its pid}.
                            orphan=true: started through a middle process that exits at once,
                            so it is orphaned and reparented (to the nearest child subreaper,
                            else init). holdStdout=true: it inherits this server's stdout, which
                            then stays open after this server exits.

Environment variables
---------------------
  FAKE_DELTAS, FAKE_TURN_SECONDS  default turn shape (see above).
  FAKE_REQUEST_SECONDS   delay the account/read and config/read answers (default 0).
  FAKE_STARTUP_SECONDS   delay the initialize answer, success or failure (default 0). The
                         server counts as initialized from the moment initialize arrives.
  FAKE_INIT_FAIL=1       answer initialize with error -32603 (the server stays uninitialized,
                         so every later request, initialize included, fails too).
  FAKE_LOG_REQUESTS=path append every line received on stdin (raw bytes, newline included,
                         blank and bad lines too) to that file, flushed per line.
  FAKE_HONOR_OPTOUT=0    ignore optOutNotificationMethods.
  FAKE_STRICT_INIT=0     same as --lenient-initialize.
  FAKE_IGNORE_EOF=1      same as --ignore-stdin-eof.

Options
-------
  --ignore-stdin-eof     keep running after stdin EOF until SIGTERM or SIGINT, like an
                         app-server that never notices its parent went away.
  --lenient-initialize   no "Not initialized" / "Already initialized" checks.
  --strict-initialize    the default; accepted for compatibility.
  --raw-big-lines        a request line over 1 MiB is answered without being parsed, so that
                         the fake's own loop is not busy for seconds (codex reads on its own
                         threads): fake/echo gets {"params": <its params' text as written>},
                         any other method {}. The line must be compact, id and method first.
  --codex-parser         read stdin as codex does: a line nested deeper than 127 levels (serde_json
                         stops at 128), and a response codex cannot parse (both result and error;
                         neither; an error that is not {code: 64-bit integer, message: string}),
                         are dropped without any answer (written to stderr, counted in
                         fake/stats as droppedLines).

Exits 0 on stdin EOF, SIGTERM or SIGINT (except as above: crash=K -> 3, fake/exit -> code,
hang=2 ignores signals). Writes nothing but protocol to stdout; diagnostics go to stderr.
"""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ARGS = sys.argv[1:]
BATCH = 64  # notifications per write when unpaced
IGNORE_EOF = "--ignore-stdin-eof" in ARGS or os.environ.get("FAKE_IGNORE_EOF") == "1"
STRICT_INIT = "--lenient-initialize" not in ARGS and os.environ.get("FAKE_STRICT_INIT") != "0"
FLUSH_SECONDS = 5.0  # bound on flushing stdout before a crash, exit or hang
CODEX_PARSER = "--codex-parser" in ARGS
RAW_BIG_LINES = "--raw-big-lines" in ARGS
BIG_LINE = 1 << 20
_BIG_REQUEST = re.compile(rb'\{"id":(-?\d+|"[^"]*"),"method":"([^"]*)","params":')
CODEX_MAX_DEPTH = 127

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_ENCODE_ASCII = json.JSONEncoder(separators=(",", ":")).encode

GARBAGE = {
    "json": b"this is not json{\n",
    "utf8": b'{"method":"x","params":{"t":"\xff\xfe"}}\n',
    "array": b"[1,2,3]\n",
    "empty": b"\n",
    "noid": b'{"result": 1}\n',
}


def encode_line(msg):
    try:
        return _ENCODE(msg).encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates: fall back to \u escapes
        return _ENCODE_ASCII(msg).encode() + b"\n"


def _reject_constant(name):
    raise ValueError(f"invalid JSON constant {name}")


def parse_line(line):
    return json.loads(line, parse_constant=_reject_constant)


def _depth(line):
    """How deep a JSON line nests (brackets outside strings), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in line.decode("utf-8", "replace"):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def codex_drops(line, msg):
    """Why codex would drop this line without answering (--codex-parser), or None."""
    if msg is None:
        return "recursion limit exceeded"
    if not isinstance(msg, dict) or "method" in msg or "id" not in msg:
        return None
    if ("result" in msg) == ("error" in msg):
        return "a response needs exactly one of result and error"
    if "error" in msg:
        err = msg["error"]
        if not (isinstance(err, dict) and type(err.get("code")) is int and -(2**63) <= err["code"] < 2**63
                and isinstance(err.get("message"), str)):
            return "error is not {code: i64, message: string}"
    return None


def _env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return float(default)


def _strings(obj):
    """All string values inside obj (recursively)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


class Shape:
    """How a turn behaves, from the switches in its text (see the module docstring)."""

    def __init__(self, text=""):
        self.deltas = int(_env_float("FAKE_DELTAS", 20))
        self.seconds = _env_float("FAKE_TURN_SECONDS", 0)
        if m := re.search(r"\bdeltas=(\d+)", text):
            self.deltas = int(m.group(1))
        if m := re.search(r"\bseconds=(\d+(?:\.\d*)?)", text):
            self.seconds = float(m.group(1))
        self.deltas, self.seconds = max(self.deltas, 0), max(self.seconds, 0.0)
        self.approve = re.search(r"\bapprove=1\b", text) is not None
        m = re.search(r"\bcrash=(\d+)", text)
        self.crash = min(int(m.group(1)), self.deltas) if m else None
        m = re.search(r"\bhang=([12])\b", text)
        self.hang = int(m.group(1)) if m else 0
        self.chunk = re.search(r"\bchunk=1\b", text) is not None
        m = re.search(r"\bsubagents=(\d+)", text)
        self.subagents = int(m.group(1)) if m else 0
        m = re.search(r"\bsubdeltas=(\d+)", text)
        self.subdeltas = int(m.group(1)) if m else 3
        self.subparent = re.search(r"\bsubparent=1\b", text) is not None
        self.subapprove = re.search(r"\bsubapprove=1\b", text) is not None
        m = re.search(r"\blinger=(\d+(?:\.\d*)?)", text)
        self.linger = float(m.group(1)) if m else 0.0


def turn_text(params):
    items = params.get("input") or []
    if isinstance(items, (str, dict)):
        items = [items]
    return " ".join(i if isinstance(i, str) else str(i.get("text", "")) for i in items if i)


class FakeAppServer:
    def __init__(self, writer, transport):
        self.out = writer
        self.transport = transport  # None when stdout is a regular file
        self.wedged = False
        self.stdout_closed = False
        self.wedge_ignores_signals = False
        self.counter = 0
        self.turns = {}  # turnId -> (threadId, task)
        self.tasks = set()  # other background tasks (keep references)
        self.interrupted = set()
        self.opt_out = set()
        self.honor_opt_out = os.environ.get("FAKE_HONOR_OPTOUT") != "0"
        self.request_delay = _env_float("FAKE_REQUEST_SECONDS", 0)
        self.startup_delay = _env_float("FAKE_STARTUP_SECONDS", 0)
        self.init_fail = os.environ.get("FAKE_INIT_FAIL") == "1"
        self.initialized = False
        self.threads = {}  # threadId -> {"id", "preview", "cwd", "turns": [{"id", "status", "items"}]}
        self.srv_next = 0  # server->client request ids: 0, 1, ...
        self.srv_pending = {}  # id -> future of the client's response message
        self.stats = {"serverRequests": 0, "serverResponses": 0, "serverErrorResponses": 0,
                      "unexpectedResponses": 0, "droppedLines": 0}

    # -- output -------------------------------------------------------------
    def write(self, data):
        if not self.wedged and not self.stdout_closed:
            self.out.write(data)

    def send(self, msg):
        self.write(encode_line(msg))

    def note_line(self, method, params):
        return b"" if method in self.opt_out else encode_line({"method": method, "params": params})

    def note(self, method, params):
        if line := self.note_line(method, params):
            self.write(line)

    def reply(self, req_id, result=None, error=None, delay=0.0):
        msg = {"id": req_id, "error": error} if error else {"id": req_id, "result": result}
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.send, msg)
        else:
            self.send(msg)

    def spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def flush(self):
        """Waits (bounded) until everything written so far has reached the stdout pipe."""
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_SECONDS
        pending = self.transport.get_write_buffer_size
        while pending() and not self.transport.is_closing() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    async def die(self, code, text):
        await self.flush()
        sys.stderr.write(f"fake app-server: {text}\n")
        sys.stderr.flush()
        os._exit(code)

    async def wedge(self, ignore_signals):
        """Stops answering anything, for good; only a signal (or SIGKILL) ends the process."""
        self.wedged = True  # from now on nothing new is written or read
        self.wedge_ignores_signals = ignore_signals
        await self.flush()
        action = signal.SIG_IGN if ignore_signals else (lambda *_: os._exit(0))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, action)
        sys.stderr.write("fake app-server: hanging\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)  # noqa: ASYNC251 (on purpose: block the loop, no reading, no answering)

    def new_id(self, prefix):
        self.counter += 1
        return f"{prefix}-{self.counter:06d}"

    def thread_record(self, thread_id):
        return self.threads.setdefault(thread_id, {"id": thread_id, "preview": "", "cwd": None, "turns": []})

    # -- dispatch -----------------------------------------------------------
    def handle(self, msg):
        method, req_id = msg.get("method"), msg.get("id")
        if method is None and "id" in msg and ("result" in msg or "error" in msg):
            self.on_response(msg)
            return
        if not isinstance(method, str) or req_id is None:
            return  # a notification (e.g. "initialized"), or junk
        raw = msg.get("params")
        params = raw if isinstance(raw, dict) else {}
        if STRICT_INIT and self.initialized == (method == "initialize"):
            message = "Already initialized" if self.initialized else "Not initialized"
            self.reply(req_id, error={"code": -32600, "message": message})
            return
        if method == "fake/echo":
            self.reply(req_id, {"params": raw})
            return
        handler = getattr(self, "m_" + method.replace("/", "_"), None)
        if handler is None:
            self.reply(req_id, error={"code": -32601, "message": f"Method not found: {method}"})
            return
        try:
            handler(req_id, params)
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. {"seconds": "x"}
            self.reply(req_id, error={"code": -32602, "message": f"Invalid params: {exc}"})

    def on_response(self, msg):
        key = msg["id"]
        valid = isinstance(key, (int, str)) and not isinstance(key, bool)
        fut = self.srv_pending.pop(key, None) if valid else None
        if fut is None or fut.done():
            self.stats["unexpectedResponses"] += 1
            print(f"fake app-server: unexpected response {_ENCODE(msg)[:200]}", file=sys.stderr, flush=True)
            return
        self.stats["serverResponses"] += 1
        if "error" in msg:
            self.stats["serverErrorResponses"] += 1
        fut.set_result(msg)

    async def server_request(self, method, params):
        """Sends a server->client request; returns the client's response message."""
        req_id = self.srv_next
        self.srv_next += 1
        fut = asyncio.get_running_loop().create_future()
        self.srv_pending[req_id] = fut
        self.stats["serverRequests"] += 1
        self.send({"id": req_id, "method": method, "params": params})
        try:
            return await fut
        finally:
            self.srv_pending.pop(req_id, None)

    # -- base methods -------------------------------------------------------
    def m_initialize(self, req_id, params):
        if self.init_fail:
            error = {"code": -32603, "message": "fake initialize failure (FAKE_INIT_FAIL=1)"}
            self.reply(req_id, error=error, delay=self.startup_delay)
            return
        self.initialized = True
        if self.honor_opt_out:
            caps = params.get("capabilities") or {}
            self.opt_out = set(caps.get("optOutNotificationMethods") or [])
        self.reply(req_id, {"userAgent": "fake-codex-app-server/0.1"}, delay=self.startup_delay)

    def m_account_read(self, req_id, params):
        self.reply(req_id, {"account": {"type": "apiKey"}, "requiresOpenaiAuth": False},
                   delay=self.request_delay)

    def m_config_read(self, req_id, params):
        self.reply(req_id, {"config": {"model": "fake-model", "approval_policy": "never"}, "origins": {}},
                   delay=self.request_delay)

    def m_thread_start(self, req_id, params):
        thread = {"id": self.new_id("thread"), "preview": "", "cwd": params.get("cwd")}
        self.threads[thread["id"]] = dict(thread, turns=[])
        self.send({"id": req_id, "result": {"thread": thread, "model": "fake-model"}})
        self.note("thread/started", {"thread": thread})

    def m_thread_read(self, req_id, params):
        record = self.threads.get(params.get("threadId"))
        if record is None:
            message = f"thread not found: {params.get('threadId')}"
            self.reply(req_id, error={"code": -32600, "message": message})
            return
        turns = [dict(t, items=list(t["items"])) for t in record["turns"]]
        if not params.get("includeTurns"):
            turns = []
        self.reply(req_id, {"thread": dict(record, turns=turns)})

    def m_thread_loaded_list(self, req_id, params):
        self.reply(req_id, {"data": list(self.threads), "nextCursor": None})

    def m_fake_stats(self, req_id, params):
        self.reply(req_id, dict(self.stats, pendingServerRequests=len(self.srv_pending),
                                turnsRunning=len(self.turns)))

    def start_turn(self, thread_id, turn_id, shape, response, item_type="agentMessage", announce=None):
        """Writes the response (then thread/started for `announce`, a new thread) and runs the turn."""
        record = {"id": turn_id, "status": "inProgress", "items": []}
        self.thread_record(thread_id)["turns"].append(record)
        head = encode_line(response)
        if announce is not None:
            head += self.note_line("thread/started", {"thread": announce})
        if shape.chunk:
            self.write(head + self.chunk_turn(thread_id, turn_id, shape, record))
            return
        self.write(head)  # response first, then the stream (as the real server does)
        coro = self.run_turn(thread_id, turn_id, shape, record, item_type)
        task = asyncio.get_running_loop().create_task(coro)
        self.turns[turn_id] = (thread_id, task)

    def m_turn_start(self, req_id, params):
        thread_id = params.get("threadId")
        if not thread_id:
            self.reply(req_id, error={"code": -32602, "message": "turn/start requires threadId"})
            return
        turn = {"id": self.new_id("turn"), "status": "inProgress", "items": []}
        response = {"id": req_id, "result": {"turn": turn}}
        self.start_turn(thread_id, turn["id"], Shape(turn_text(params)), response)

    def m_turn_interrupt(self, req_id, params):
        turn_id = params.get("turnId")
        entry = self.turns.get(turn_id)
        if entry is None or entry[0] != params.get("threadId"):
            self.reply(req_id, error={"code": -32600, "message": f"no turn in progress: {turn_id}"})
            return
        self.reply(req_id, {})
        self.interrupted.add(turn_id)
        entry[1].cancel()

    def m_review_start(self, req_id, params):
        thread_id = params.get("threadId")
        if not thread_id:
            self.reply(req_id, error={"code": -32602, "message": "review/start requires threadId"})
            return
        parent = self.thread_record(thread_id)
        review_id, announce = thread_id, None
        if params.get("delivery") != "inline":
            review_id = self.new_id("thread")
            announce = {"id": review_id, "preview": "", "cwd": parent["cwd"]}
            self.threads[review_id] = dict(announce, turns=[])
        turn = {"id": self.new_id("turn"), "status": "inProgress", "items": []}
        shape = Shape(" ".join(_strings(params.get("target"))))
        response = {"id": req_id, "result": {"turn": turn, "reviewThreadId": review_id}}
        self.start_turn(review_id, turn["id"], shape, response, announce=announce)

    def m_thread_compact_start(self, req_id, params):
        thread_id = params.get("threadId")
        if not thread_id:
            self.reply(req_id, error={"code": -32602, "message": "thread/compact/start requires threadId"})
            return
        response = {"id": req_id, "result": {}}  # no turn id: route by threadId
        self.start_turn(thread_id, self.new_id("turn"), Shape("deltas=0 seconds=0"), response,
                        item_type="contextCompaction")

    # -- misbehaviour methods -------------------------------------------------
    def m_fake_garbage(self, req_id, params):
        line = GARBAGE.get(params.get("kind"))
        if line is None:
            self.reply(req_id, error={"code": -32602, "message": f"unknown kind, one of {sorted(GARBAGE)}"})
            return
        self.write(line)
        self.reply(req_id, {"ok": True})

    def m_fake_big(self, req_id, params):
        self.reply(req_id, {"data": "x" * int(params.get("bytes", 0))})

    def m_fake_notify(self, req_id, params):
        self.reply(req_id, {})
        self.spawn(self.notify(int(params.get("count", 0)), params.get("threadId")))

    async def notify(self, count, thread_id):
        extra = {"threadId": thread_id} if thread_id is not None else {}
        batch = []
        for i in range(count):
            batch.append(self.note_line("fake/tick", {"i": i, **extra}))
            if len(batch) >= BATCH:
                self.write(b"".join(batch))
                batch.clear()
                await self.out.drain()
        self.write(b"".join(batch))

    def m_fake_serverRequest(self, req_id, params):
        method = params.get("method") or "item/tool/requestUserInput"
        body = params.get("params")
        if not isinstance(body, dict):
            body = {"itemId": self.new_id("item"),
                    "questions": [{"id": "q1", "header": "Fake", "question": "Fake?", "options": None}]}
        body = {**{k: params[k] for k in ("threadId", "turnId") if k in params}, **body}

        async def ask():
            answer = await self.server_request(method, body)
            self.reply(req_id, {"response": answer})

        self.spawn(ask())

    def m_fake_slow(self, req_id, params):
        self.reply(req_id, {}, delay=float(params.get("seconds", 0)))

    def m_fake_exit(self, req_id, params):
        code = int(params.get("code", 1))
        self.spawn(self.die(code, f"exiting with code {code}"))

    def m_fake_hang(self, req_id, params):
        self.wedged = True  # stop reading at once; the task does the rest
        self.spawn(self.wedge(bool(params.get("ignoreSignals"))))

    def m_fake_stderr(self, req_id, params):
        sys.stderr.write(str(params.get("text", "")))
        sys.stderr.flush()
        self.reply(req_id, {})

    def m_fake_stderrFlood(self, req_id, params):
        seconds = float(params.get("seconds", 1))
        line = b"flood " + b"e" * max(int(params.get("lineBytes", 200)) - 7, 0) + b"\n"
        loop = asyncio.get_running_loop()

        def flood():
            lines, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                os.write(2, line * 64)
                lines += 64
            loop.call_soon_threadsafe(self.reply, req_id, {"lines": lines})

        threading.Thread(target=flood, daemon=True).start()

    def m_fake_closeStdout(self, req_id, params):
        self.stdout_closed = True
        if self.transport is not None:
            self.transport.abort()  # leaves fd 1 open (sys.stdout does not own it)
        os.close(1)

    def m_fake_spawn(self, req_id, params):
        sleeper = [sys.executable, "-c", f"import time; time.sleep({float(params.get('seconds', 60))})", *ARGS]
        if params.get("orphan"):
            middle = ("import subprocess, sys; p = subprocess.Popen(sys.argv[1:], start_new_session=True, "
                      "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL); print(p.pid, flush=True)")
            out = subprocess.run([sys.executable, "-c", middle, *sleeper], stdout=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, check=True).stdout
            pid = int(out)
        else:
            stdout = None if params.get("holdStdout") else subprocess.DEVNULL
            pid = subprocess.Popen(sleeper, start_new_session=True, stdin=subprocess.DEVNULL, stdout=stdout).pid
        self.reply(req_id, {"pid": pid})

    # -- streaming turn ------------------------------------------------------
    def chunk_turn(self, thread_id, turn_id, shape, record):
        """The whole turn's notifications as one bytes object (chunk=1)."""
        item_id = f"item-{turn_id}"
        base = {"threadId": thread_id, "turnId": turn_id}
        text = "".join(f"w{i} " for i in range(shape.deltas))
        record["status"] = "completed"
        record["items"] = [{"type": "agentMessage", "id": item_id, "text": text[:65536]}]
        item = {"type": "agentMessage", "id": item_id, "text": ""}
        turn = {"id": turn_id, "status": "inProgress"}
        lines = [self.note_line("turn/started", {"threadId": thread_id, "turn": turn}),
                 self.note_line("item/started", {**base, "item": item})]
        lines += [self.note_line("item/agentMessage/delta", {**base, "itemId": item_id, "delta": f"w{i} "})
                  for i in range(shape.deltas)]
        turn = {"id": turn_id, "status": "completed", "items": []}
        lines += [self.note_line("item/completed", {**base, "item": dict(item, text=text)}),
                  self.note_line("turn/completed", {"threadId": thread_id, "turn": turn})]
        return b"".join(lines)

    async def run_turn(self, thread_id, turn_id, shape, record, item_type="agentMessage"):
        loop = asyncio.get_running_loop()
        item_id = f"item-{turn_id}"
        base = {"threadId": thread_id, "turnId": turn_id}
        parts, status = [], "completed"
        deltas, seconds = shape.deltas, shape.seconds
        item = {"type": item_type, "id": item_id} | ({"text": ""} if item_type == "agentMessage" else {})
        chain = [self.new_id("thread") for _ in range(shape.subagents)]
        if chain:
            self.announce_sub_agent(chain[0], thread_id, 1, shape)
        self.note("turn/started", {"threadId": thread_id, "turn": {"id": turn_id, "status": "inProgress"}})
        if chain:
            await self.run_sub_agents(thread_id, turn_id, chain, shape)
        if shape.hang:
            await self.wedge(shape.hang == 2)
        self.note("item/started", {**base, "item": item})
        skip = "item/agentMessage/delta" in self.opt_out
        try:
            if shape.crash == 0:
                await self.die(3, "crashing mid-turn")
            if shape.approve:
                answer = await self.server_request("item/commandExecution/requestApproval", {
                    **base, "itemId": f"cmd-{turn_id}", "command": "echo fake", "cwd": "."})
                result = answer.get("result") if "error" not in answer else None
                decision = result.get("decision") if isinstance(result, dict) else None
                delta = f"decision={decision if isinstance(decision, str) and decision else 'decline'} "
                self.note("item/agentMessage/delta", {**base, "itemId": item_id, "delta": delta})
                parts.append(delta)
            step, start, batch = (seconds / deltas if deltas else 0.0), loop.time(), []
            for i in range(deltas):
                delta = f"w{i} "
                if skip:
                    pass
                elif step:
                    wait = start + (i + 1) * step - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self.note("item/agentMessage/delta", {**base, "itemId": item_id, "delta": delta})
                else:
                    batch.append(self.note_line("item/agentMessage/delta",
                                                {**base, "itemId": item_id, "delta": delta}))
                    if len(batch) >= BATCH:
                        self.write(b"".join(batch))
                        batch.clear()
                        await self.out.drain()  # backpressure
                        await asyncio.sleep(0)  # fairness: let other requests in
                parts.append(delta)
                if shape.crash == i + 1:
                    self.write(b"".join(batch))
                    await self.die(3, "crashing mid-turn")
            if batch:
                self.write(b"".join(batch))
            if (remaining := start + seconds - loop.time()) > 0:
                await asyncio.sleep(remaining)  # deltas=0 or opted out: still last S seconds
        except asyncio.CancelledError:
            if turn_id not in self.interrupted:
                raise
            status = "interrupted"
            if shape.linger:  # slow to acknowledge the interrupt (codex winding a tool call down)
                await asyncio.sleep(shape.linger)
        finally:
            self.turns.pop(turn_id, None)
            self.interrupted.discard(turn_id)
        text = "".join(parts)
        record["status"] = status
        if item_type == "agentMessage":
            item = dict(item, text=text)
            record["items"] = [dict(item, text=text[:65536])]
        else:
            record["items"] = [item]
        self.note("item/completed", {**base, "item": item})
        turn = {"id": turn_id, "status": status, "items": []}
        self.note("turn/completed", {"threadId": thread_id, "turn": turn})


    def announce_sub_agent(self, child, parent, depth, shape):
        thread = {"id": child, "preview": "", "cwd": None, "name": None, "agentNickname": f"Scout-{depth}"}
        if shape.subparent:
            thread["parentThreadId"] = parent
            thread["source"] = {"subAgent": {"thread_spawn": {"parent_thread_id": parent, "depth": depth}}}
        self.threads[child] = dict(thread, turns=[])
        self.note("thread/started", {"thread": thread})

    async def run_sub_agents(self, sender, sender_turn, chain, shape):
        """The sub-agent chain[0], spawned by `sender` in its turn, and the rest of the chain
        nested under it (see subagents=N)."""
        child, rest = chain[0], chain[1:]
        collab = {"type": "collabAgentToolCall", "id": f"collab-{child}", "tool": "spawnAgent",
                  "status": "inProgress", "senderThreadId": sender, "receiverThreadIds": [child],
                  "prompt": "help", "model": None, "reasoningEffort": None, "agentsStates": {}}
        self.note("item/started", {"threadId": sender, "turnId": sender_turn, "item": collab})
        turn_id = self.new_id("turn")
        base = {"threadId": child, "turnId": turn_id}
        self.note("turn/started", {"threadId": child, "turn": {"id": turn_id, "status": "inProgress"}})
        if rest:
            self.announce_sub_agent(rest[0], child, len(chain) - len(rest) + 1, shape)
            await self.run_sub_agents(child, turn_id, rest, shape)
        item = {"type": "agentMessage", "id": f"item-{turn_id}", "text": ""}
        self.note("item/started", {**base, "item": item})
        parts = []
        if shape.subapprove and not rest:
            answer = await self.server_request("item/commandExecution/requestApproval", {
                **base, "itemId": f"cmd-{turn_id}", "command": "echo sub", "cwd": "."})
            result = answer.get("result") if "error" not in answer else None
            decision = result.get("decision") if isinstance(result, dict) else None
            parts.append(f"decision={decision if isinstance(decision, str) and decision else 'decline'} ")
        parts += [f"s{i} " for i in range(shape.subdeltas)]
        for delta in parts:
            self.note("item/agentMessage/delta", {**base, "itemId": item["id"], "delta": delta})
        self.note("item/completed", {**base, "item": dict(item, text="".join(parts))})
        self.note("turn/completed", {"threadId": child, "turn": {"id": turn_id, "status": "completed", "items": []}})
        self.note("item/completed", {"threadId": sender, "turnId": sender_turn,
                                     "item": dict(collab, status="completed")})


class StdoutProtocol(asyncio.streams.FlowControlMixin):
    """Write-pipe protocol with backpressure and a close waiter (for wait_closed)."""

    def __init__(self):
        super().__init__()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def _get_close_waiter(self, stream):
        return self.closed


class BlockingWriter:
    """Stand-in for StreamWriter when stdout is a regular file (no pipe transport)."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    async def drain(self):
        pass

    def close(self):
        pass

    async def wait_closed(self):
        pass


async def serve():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        transport, protocol = await loop.connect_write_pipe(StdoutProtocol, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    except ValueError:  # stdout is a regular file
        transport, writer = None, BlockingWriter(sys.stdout.fileno())
    server = FakeAppServer(writer, transport)
    log_path = os.environ.get("FAKE_LOG_REQUESTS")
    log = open(log_path, "ab") if log_path else None  # noqa: ASYNC230 (lives as long as the process)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def read_loop():
        while line := await reader.readline():
            if log is not None:
                log.write(line)
                log.flush()
            if server.wedged:
                return
            if RAW_BIG_LINES and len(line) > BIG_LINE and (big := _BIG_REQUEST.match(line)):
                view = memoryview(line)
                end = len(line) - (2 if line.endswith(b"\n") else 1)  # the params' text, the closing } aside
                params = view[big.end():end] if big.group(2) == b"fake/echo" else None
                result = [b'{"params":', params, b"}"] if params is not None else [b"{}"]
                server.write(b"".join([b'{"id":', view[big.start(1):big.end(1)], b',"result":', *result, b"}\n"]))
                await writer.drain()
                continue
            if not line.strip():
                continue
            if CODEX_PARSER and _depth(line) > CODEX_MAX_DEPTH:
                msg = None
            else:
                try:
                    msg = parse_line(line)
                except ValueError as exc:
                    server.send({"id": None, "error": {"code": -32700, "message": f"Parse error: {exc}"}})
                    continue
            if CODEX_PARSER and (why := codex_drops(line, msg)):
                server.stats["droppedLines"] += 1
                print(f"fake app-server: dropped a line as codex would: {why}", file=sys.stderr, flush=True)
                continue
            if isinstance(msg, dict):
                server.handle(msg)
            if not server.stdout_closed:
                await writer.drain()

    reading = loop.create_task(read_loop())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if server.wedged and not (stop.is_set() and not server.wedge_ignores_signals):
        await asyncio.Future()  # the wedge task is about to take over the loop thread for good
    if IGNORE_EOF and not stop.is_set():
        await stopping  # stdin is gone; only a signal ends us
    for task in [reading, stopping, *server.tasks] + [t for _, t in server.turns.values()]:
        task.cancel()
    if stop.is_set() and transport is not None:
        transport.abort()
        return
    writer.close()  # EOF: flush what was already written (bounded), then exit
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (TimeoutError, OSError):
        pass


def main():
    try:
        asyncio.run(serve())
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
