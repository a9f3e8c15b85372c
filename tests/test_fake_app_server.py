"""Fast checks of tests/fake_app_server.py itself, spawned directly (no broker)."""

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake_app_server.py")
TIMEOUT = 15.0


class Fake:
    """The fake on pipes; reads stdout with os.read so that write chunks can be observed."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, str(FAKE), *args], env={**os.environ, **env},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buf = b""
        self.ids = 0

    def send(self, msg):
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method, params=None):
        self.ids += 1
        self.send({"id": self.ids, "method": method, "params": params or {}})
        return self.ids

    def chunk(self):
        """One os.read of stdout; EOFError at end of stream."""
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], TIMEOUT)[0]:
            raise TimeoutError("no output from the fake")
        data = os.read(fd, 1 << 20)
        if not data:
            raise EOFError
        return data

    def raw_line(self):
        while b"\n" not in self.buf:
            self.buf += self.chunk()
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def line(self):
        return json.loads(self.raw_line())

    def until(self, pred):
        """Messages read up to and including the first one matching pred."""
        seen = [self.line()]
        while not pred(seen[-1]):
            seen.append(self.line())
        return seen

    def call(self, method, params=None):
        req_id = self.request(method, params)
        return self.until(lambda m: m.get("id") == req_id and "method" not in m)[-1]

    def start_thread(self):
        assert "userAgent" in self.call("initialize", {"clientInfo": {"name": "t", "version": "0"}})["result"]
        self.send({"method": "initialized"})
        thread_id = self.call("thread/start", {"cwd": "/tmp"})["result"]["thread"]["id"]
        assert self.line() == {"method": "thread/started",
                               "params": {"thread": {"id": thread_id, "preview": "", "cwd": "/tmp"}}}
        return thread_id

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except BrokenPipeError:
                pass


@pytest.fixture
def spawn():
    fakes = []

    def start(*args, **env):
        fakes.append(Fake(args, env))
        return fakes[-1]

    yield start
    for fake in fakes:
        fake.close()


def turn_input(text):
    return [{"type": "text", "text": text}]


def methods(msgs):
    return [m.get("method") for m in msgs]


def test_handshake_and_turn_then_eof_exits_0(spawn):
    fake = spawn()
    thread_id = fake.start_thread()
    req_id = fake.request("turn/start", {"threadId": thread_id, "input": turn_input("deltas=5")})
    msgs = fake.until(lambda m: m.get("method") == "turn/completed")
    assert msgs[0]["id"] == req_id and msgs[0]["result"]["turn"]["status"] == "inProgress"
    assert methods(msgs) == [None, "turn/started", "item/started", *["item/agentMessage/delta"] * 5,
                             "item/completed", "turn/completed"]
    assert msgs[-2]["params"]["item"]["text"] == "w0 w1 w2 w3 w4 "
    assert msgs[-1]["params"] == {"threadId": thread_id, "turn": {
        "id": msgs[0]["result"]["turn"]["id"], "status": "completed", "items": []}}
    fake.proc.stdin.close()
    assert fake.proc.wait(TIMEOUT) == 0


def test_strict_initialize_by_default(spawn):
    fake = spawn()
    assert fake.call("thread/loaded/list")["error"] == {"code": -32600, "message": "Not initialized"}
    assert "result" in fake.call("initialize")
    assert fake.call("initialize")["error"] == {"code": -32600, "message": "Already initialized"}
    lenient = spawn("--lenient-initialize")
    assert "result" in lenient.call("thread/loaded/list")
    assert "result" in lenient.call("initialize") and "result" in lenient.call("initialize")


def test_chunk_turn_is_one_write_with_the_response_first(spawn):
    fake = spawn()
    thread_id = fake.start_thread()
    assert fake.buf == b""
    req_id = fake.request("turn/start", {"threadId": thread_id, "input": turn_input("chunk=1 deltas=3")})
    lines = [json.loads(line) for line in fake.chunk().splitlines()]  # a single read gets it all
    assert lines[0]["id"] == req_id
    assert methods(lines) == [None, "turn/started", "item/started", *["item/agentMessage/delta"] * 3,
                              "item/completed", "turn/completed"]


def test_crash_mid_turn(spawn):
    fake = spawn()
    thread_id = fake.start_thread()
    fake.request("turn/start", {"threadId": thread_id, "input": turn_input("deltas=10 crash=3")})
    msgs = []
    with pytest.raises(EOFError):
        while True:
            msgs.append(fake.line())
    assert methods(msgs) == [None, "turn/started", "item/started", *["item/agentMessage/delta"] * 3]
    assert fake.proc.wait(TIMEOUT) == 3
    assert b"fake app-server: crashing mid-turn\n" in fake.proc.stderr.read()


def test_garbage_line_then_answer(spawn):
    fake = spawn()
    fake.call("initialize")
    expected = {"json": b"this is not json{", "utf8": b'{"method":"x","params":{"t":"\xff\xfe"}}',
                "array": b"[1,2,3]", "empty": b"", "noid": b'{"result": 1}'}
    for kind, bad in expected.items():
        req_id = fake.request("fake/garbage", {"kind": kind})
        assert fake.raw_line() == bad
        assert fake.line() == {"id": req_id, "result": {"ok": True}}


def test_hang_stops_answering_but_sigterm_exits_0(spawn):
    fake = spawn()
    fake.call("initialize")
    fake.request("fake/hang")
    assert fake.proc.stderr.readline() == b"fake app-server: hanging\n"
    fake.request("fake/stats")
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.proc.wait(TIMEOUT) == 0
    with pytest.raises(EOFError):
        fake.chunk()  # fake/stats was never answered
