"""Real ``codex app-server`` turns, fully offline, against the local Responses mock.

The codex launcher comes from ``$CODEX_BIN`` (default ``node_modules/.bin/codex`` under the
repo root; relative values are taken relative to the repo root).  If it is missing, the
``codex``-marked tests fail -- they do not skip.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mock_responses import MOCK_MODEL, MockResponses, expected_text, last_user_text, write_codex_home

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERALL_TIMEOUT = 90.0  # seconds, per test; generous: a mock turn takes well under a second

Message = dict[str, Any]


def codex_bin() -> Path:
    raw = os.environ.get("CODEX_BIN") or "node_modules/.bin/codex"
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(
            f"codex launcher not found at {path}. Install it (`npm install @openai/codex@0.169.0` in "
            f"{REPO_ROOT}) or point CODEX_BIN at a `codex` launcher.",
            pytrace=False,
        )
    return path


def text_input(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "text_elements": []}]


class AppServer:
    """Minimal JSON-RPC-over-JSONL client for a ``codex app-server`` child process.

    Every message codex writes is appended to :attr:`log`; :meth:`wait_for` scans the log
    from an index onwards, reading more lines as needed, so nothing is lost between waits.
    """

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, stderr_path: Path) -> None:
        self.deadline = time.monotonic() + OVERALL_TIMEOUT
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own process group: node launcher + native codex
        )
        self.log: list[Message] = []
        self._lines: queue.Queue[Message | None] = queue.Queue()
        self._eof = False
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="codex-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = {"_unparsed": line}
                self._lines.put(msg)
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: Any) -> int:
        self._next_id += 1
        self.send({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params})
        return self._next_id

    def notify(self, method: str, params: Any = None) -> None:
        msg: Message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def respond(self, request_id: Any, result: Any) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})

    # -- receiving -----------------------------------------------------------------------

    def stderr_tail(self, limit: int = 3000) -> str:
        self._stderr.flush()
        return self.stderr_path.read_bytes()[-limit:].decode("utf-8", "replace")

    def wait_for(self, pred: Callable[[Message], bool], what: str, start: int = 0) -> int:
        """Index in :attr:`log` of the first message at/after ``start`` matching ``pred``."""
        i = start
        while True:
            while i < len(self.log):
                if pred(self.log[i]):
                    return i
                i += 1
            remaining = self.deadline - time.monotonic()
            if self._eof or remaining <= 0:
                tail = "\n".join(json.dumps(m)[:300] for m in self.log[-15:])
                reason = "codex closed stdout" if self._eof else f"timed out after {OVERALL_TIMEOUT}s"
                pytest.fail(
                    f"{reason} while waiting for {what}.\nlast messages:\n{tail}\n"
                    f"codex stderr (tail):\n{self.stderr_tail()}",
                    pytrace=False,
                )
            try:
                msg = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if msg is None:
                self._eof = True
            else:
                self.log.append(msg)

    def call(self, method: str, params: Any) -> Any:
        mark = len(self.log)
        rid = self.request(method, params)
        idx = self.wait_for(lambda m: m.get("id") == rid and "method" not in m, f"response to {method}", mark)
        msg = self.log[idx]
        assert "error" not in msg, f"{method} failed: {msg['error']}"
        return msg["result"]

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> int | None:
        """Close stdin (codex exits on EOF), reap the process; kill its group if it lingers."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
                return None
        finally:
            self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()


@pytest.fixture
def mock() -> Any:
    with MockResponses() as server:
        yield server


def start_codex(tmp_path: Path, mock: MockResponses, **home_kwargs: Any) -> tuple[AppServer, Path, Path]:
    launcher = codex_bin()
    home = tmp_path / "codex-home"
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**os.environ, **write_codex_home(home, mock.base_url, **home_kwargs)}
    server = AppServer([str(launcher), "app-server"], env, workdir, tmp_path / "codex-stderr.log")
    return server, home, workdir


def handshake(srv: AppServer, workdir: Path, **thread_params: Any) -> str:
    init = srv.call(
        "initialize",
        {
            "clientInfo": {"name": "codex-broker-tests", "title": None, "version": "0.0.0"},
            "capabilities": {"experimentalApi": False},
        },
    )
    assert init["platformOs"]
    srv.notify("initialized")
    started = srv.call("thread/start", {"cwd": str(workdir), **thread_params})
    return str(started["thread"]["id"])


def for_turn(thread_id: str, turn_id: str) -> Callable[[Message], bool]:
    def pred(m: Message) -> bool:
        p = m.get("params") or {}
        return bool(
            p.get("threadId") == thread_id and (p.get("turnId") == turn_id or p.get("turn", {}).get("id") == turn_id)
        )

    return pred


def is_turn_completed(turn_id: str) -> Callable[[Message], bool]:
    return lambda m: m.get("method") == "turn/completed" and m["params"]["turn"]["id"] == turn_id


# ----------------------------------------------------------------------------------------
# The mock on its own (no codex needed)
# ----------------------------------------------------------------------------------------


def test_mock_streams_responses_sse(mock: MockResponses) -> None:
    body = {
        "model": MOCK_MODEL,
        "stream": True,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi reply=ab deltas=2"}]}
        ],
    }
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
    try:
        conn.request("POST", "/v1/responses", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        raw = resp.read().decode()
    finally:
        conn.close()
    events = [json.loads(line[len("data: ") :]) for line in raw.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == [
        "response.created",
        "response.output_item.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "abab"
    assert events[-2]["item"]["content"][0]["text"] == "abab"
    assert mock.requests == [body]


# ----------------------------------------------------------------------------------------
# Real codex app-server
# ----------------------------------------------------------------------------------------


@pytest.mark.codex
def test_full_turn_against_mock(tmp_path: Path, mock: MockResponses) -> None:
    srv, home, workdir = start_codex(tmp_path, mock)
    try:
        init_mark = len(srv.log)
        init = srv.call(
            "initialize",
            {
                "clientInfo": {"name": "codex-broker-tests", "title": None, "version": "0.0.0"},
                "capabilities": {"experimentalApi": False},
            },
        )
        assert Path(init["codexHome"]).resolve() == home.resolve(), srv.log[init_mark:]
        assert init["userAgent"].startswith("codex-broker-tests/")  # "<clientInfo.name>/<codex version> (...)"
        srv.notify("initialized")

        started = srv.call("thread/start", {"cwd": str(workdir), "approvalPolicy": "never"})
        thread_id = started["thread"]["id"]
        assert started["modelProvider"] == "mock"
        assert started["model"] == MOCK_MODEL
        assert started["approvalPolicy"] == "never"

        prompt = "hello there reply=pong deltas=3"
        want = expected_text(prompt)
        assert want == "pongpongpong"

        mark = len(srv.log)
        turn = srv.call("turn/start", {"threadId": thread_id, "input": text_input(prompt)})["turn"]
        turn_id = turn["id"]
        assert turn["status"] == "inProgress"

        end = srv.wait_for(is_turn_completed(turn_id), "turn/completed", mark)
        msgs = srv.log[mark : end + 1]
        methods = [m.get("method") for m in msgs]

        deltas = [m["params"] for m in msgs if m.get("method") == "item/agentMessage/delta"]
        assert len(deltas) == 3, methods
        assert all(d["threadId"] == thread_id and d["turnId"] == turn_id for d in deltas)
        assert "".join(d["delta"] for d in deltas) == want
        assert len({d["itemId"] for d in deltas}) == 1

        agent_done = [
            m for m in msgs if m.get("method") == "item/completed" and m["params"]["item"]["type"] == "agentMessage"
        ]
        assert len(agent_done) == 1, methods
        assert agent_done[0]["params"]["item"]["text"] == want
        assert agent_done[0]["params"]["item"]["id"] == deltas[0]["itemId"]

        # Order: turn/started < first delta < agentMessage item/completed < turn/completed (last).
        i_started = methods.index("turn/started")
        i_delta = methods.index("item/agentMessage/delta")
        i_done = msgs.index(agent_done[0])
        assert i_started < i_delta < i_done < len(msgs) - 1, methods

        # Every turn-scoped notification names this thread and turn.
        for m in msgs:
            params = m.get("params") or {}
            if "turnId" in params:
                assert for_turn(thread_id, turn_id)(m), m

        completed = msgs[-1]["params"]
        assert completed["threadId"] == thread_id
        assert completed["turn"]["status"] == "completed"
        assert completed["turn"]["error"] is None
        texts = [i["text"] for i in completed["turn"]["items"] if i["type"] == "agentMessage"]
        assert texts == [want]

        assert len(mock.requests) == 1
        request = mock.requests[0]
        assert request["model"] == MOCK_MODEL
        assert request["stream"] is True
        assert last_user_text(request) == prompt
    finally:
        rc = srv.close()
    assert rc == 0, f"codex exited with {rc} on stdin EOF\n{srv.stderr_tail()}"


@pytest.mark.codex
def test_command_approval_roundtrip(tmp_path: Path, mock: MockResponses) -> None:
    srv, _home, workdir = start_codex(tmp_path, mock)  # on-request + read-only sandbox
    try:
        thread_id = handshake(srv, workdir)
        mark = len(srv.log)
        turn_id = srv.call(
            "turn/start", {"threadId": thread_id, "input": text_input("run it approve=1 reply=done deltas=2")}
        )["turn"]["id"]

        idx = srv.wait_for(
            lambda m: m.get("method") == "item/commandExecution/requestApproval" and "id" in m,
            "item/commandExecution/requestApproval",
            mark,
        )
        approval = srv.log[idx]
        params = approval["params"]
        assert params["threadId"] == thread_id
        assert params["turnId"] == turn_id
        assert "uname -s" in params["command"]
        assert "accept" in params["availableDecisions"]
        srv.respond(approval["id"], {"decision": "accept"})

        end = srv.wait_for(is_turn_completed(turn_id), "turn/completed", idx)
        msgs = srv.log[idx : end + 1]
        resolved = [m for m in msgs if m.get("method") == "serverRequest/resolved"]
        assert resolved and resolved[0]["params"]["requestId"] == approval["id"]
        commands = [
            m["params"]["item"]
            for m in msgs
            if m.get("method") == "item/completed" and m["params"]["item"]["type"] == "commandExecution"
        ]
        assert len(commands) == 1
        assert commands[0]["id"] == params["itemId"]
        assert commands[0]["status"] == "completed"
        assert commands[0]["exitCode"] == 0

        turn = srv.log[end]["params"]["turn"]
        assert turn["status"] == "completed"
        assert [i["text"] for i in turn["items"] if i["type"] == "agentMessage"] == ["donedone"]

        assert len(mock.requests) == 2
        outputs = [i for i in mock.requests[1]["input"] if i.get("type") == "function_call_output"]
        assert [o["call_id"] for o in outputs] == [params["itemId"]]
    finally:
        srv.close()


@pytest.mark.codex
def test_interrupt_long_turn(tmp_path: Path, mock: MockResponses) -> None:
    srv, _home, workdir = start_codex(tmp_path, mock)
    try:
        thread_id = handshake(srv, workdir)
        mark = len(srv.log)
        # 50 deltas 0.2 s apart: ~10 s if nobody interrupts.
        turn_id = srv.call(
            "turn/start", {"threadId": thread_id, "input": text_input("slow reply=tick deltas=50 delay=0.2")}
        )["turn"]["id"]
        first = srv.wait_for(
            lambda m: m.get("method") == "item/agentMessage/delta" and m["params"]["turnId"] == turn_id,
            "first delta",
            mark,
        )
        t0 = time.monotonic()
        assert srv.call("turn/interrupt", {"threadId": thread_id, "turnId": turn_id}) == {}
        end = srv.wait_for(is_turn_completed(turn_id), "turn/completed after interrupt", first)
        elapsed = time.monotonic() - t0
        turn = srv.log[end]["params"]["turn"]
        assert turn["status"] == "interrupted"
        assert elapsed < 5.0, elapsed
        deltas = [m for m in srv.log[mark:end] if m.get("method") == "item/agentMessage/delta"]
        assert len(deltas) < 50

        # The thread is usable again afterwards.
        mark = len(srv.log)
        turn_id2 = srv.call("turn/start", {"threadId": thread_id, "input": text_input("again reply=ok deltas=1")})[
            "turn"
        ]["id"]
        end = srv.wait_for(is_turn_completed(turn_id2), "second turn/completed", mark)
        assert srv.log[end]["params"]["turn"]["status"] == "completed"
    finally:
        srv.close()
