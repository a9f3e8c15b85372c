"""Soak: several clients keep sending requests and running turns through ``ensure_broker``
while the workspace's broker is rotated every few seconds and its app-server is SIGKILLed
once. Everything is accounted for:

- every request gets exactly one response, or a retryable error (the draining error -32600
  with data.reason serverShuttingDown, UNAVAILABLE, SessionClosed, app-server exited -32002);
- every started turn completes (status completed, with every delta and the right text), or is
  reported interrupted, or failed with SessionClosed on the broker whose app-server was killed;
- nothing is duplicated (responses counted per request id, turn/completed per turn);
- rotated brokers drain, finish their turns and exit by themselves;
- nothing leaks: processes, the test process's fds and threads, files in the runtime and
  state directories (apart from logs and the rotation history).

The figures are printed and, when SOAK_REPORT names a file, written there as JSON.
SOAK_SECONDS sets the length of the load phase (default 60).

A second, shorter test drains brokers while clients send requests back to back, the race the
soak meets only now and then: a request the broker forwarded must get its response."""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import platform
import random
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import pytest
from fault_support import Ledger, RecordingSession
from harness import WAIT, fake_command, new_marker, open_fds, processes_with, serve, short_dir, wait_for

from lifecycle import cli, identity
from lifecycle.client import BrokerClient
from lifecycle.ensure import BrokerSession, ensure_broker, rotate_broker
from lifecycle.errors import AppServerError, BrokerError, CallTimeout, ConnectError, SessionClosed
from lifecycle.state import WorkspaceState, state_root
from protos import broker_pb2, broker_pb2_grpc

LOAD_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
CLIENTS = 6
ROTATE_EVERY = 4.0
KILL_AT = 0.45  # of the load phase
REQUEST_TIMEOUT = 30.0
TURN_TIMEOUT = 60.0
WATCHER_DEADLINE = 1.0  # DESIGN: a watcher gets an error within a second of the app-server's death
RETRY = object()  # a retryable error happened: re-ensure and go on


def retryable(exc: BaseException) -> str | None:
    """The kind of a retryable error, or None when the error is not one a client may retry."""
    if isinstance(exc, SessionClosed):
        return "session_closed"
    if isinstance(exc, AppServerError):
        if exc.code == -32600 and isinstance(exc.data, dict) and exc.data.get("reason") == "serverShuttingDown":
            return "draining"
        if exc.code == -32002:
            return "app_server_exited"
    if isinstance(exc, ConnectError) and "cannot reach the broker" in str(exc):
        return "unavailable"
    return None


class Verdicts(logging.Handler):
    """Counts the lifecycle's decisions ("aged: ...", "dead: ...") as it logs them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = collections.Counter[str]()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        head = text.split(":", 1)[0]
        if head in {"none", "dead", "foreign", "wedged", "draining", "unhealthy", "aged", "mismatched", "rotate"}:
            self.seen[text.split(";")[0].split(" (")[0][:90]] += 1
        elif record.levelno >= logging.WARNING:
            self.seen[f"warning: {text[:90]}"] += 1


class Soak:
    def __init__(self, workspace: Path, marker: str, request_log: Path):
        self.workspace = workspace
        self.request_log = request_log
        self.marker = marker
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.brokers: dict[str, tuple[int, float | None]] = {}  # instance -> (pid, create time)
        self.killed_instance: str | None = None
        self.kill_time = 0.0
        self.draining_since: dict[str, float] = {}  # rotated broker -> when its drain had begun
        self.kill_facts: dict[str, Any] = {}
        self.calls = collections.Counter[str]()
        self.call_ids = iter(range(1, 1 << 62))
        self.server_requests = 0
        self.deltas = 0
        self.tags = iter(range(1, 1 << 62))
        self.unanswered: dict[str, tuple[int, str, str]] = {}  # tag -> request that got SessionClosed

    # -- bookkeeping ------------------------------------------------------------------------
    def saw(self, b: BrokerSession) -> None:
        with self.lock:
            if b.instance_id not in self.brokers:
                self.brokers[b.instance_id] = (b.pid, identity.process_create_time(b.pid))

    def guarded(self, name: str, body: Any, *args: Any) -> None:
        try:
            body(*args)
        except BaseException:
            self.ledger.problem(f"{name} crashed:\n{traceback.format_exc()}")
            self.stop.set()

    # -- a client ---------------------------------------------------------------------------
    def client(self, n: int) -> None:
        rng = random.Random(1000 + n)
        while not self.stop.is_set():
            try:
                b = ensure_broker(self.workspace)
            except BrokerError as exc:
                self.ledger.problem(f"client {n}: ensure_broker failed: {exc}")
                self.stop.wait(0.5)
                continue
            self.saw(b)
            self.ledger.count(f"ensure:{b.verdict}")
            with BrokerClient(b.endpoint) as client:
                session = RecordingSession(client.channel, self.ledger, b.instance_id)
                try:
                    self.session_loop(rng, client, session, b.instance_id)
                finally:
                    session.close()

    def session_loop(self, rng: random.Random, client: BrokerClient, session: RecordingSession,
                     instance: str) -> None:
        """Works on one Session until a retryable error (or, now and then, on purpose)."""
        thread_id = None
        for _ in range(rng.randint(10, 40)):
            if self.stop.is_set():
                return
            if thread_id is None:
                result = self.request(session, "thread/start", {"cwd": str(self.workspace)})
                if result is RETRY:
                    return
                thread_id = result["thread"]["id"]
            op = rng.random()
            if op < 0.3:
                ok = self.echo(session, rng)
            elif op < 0.4:
                ok = self.request(session, "fake/slow", {"seconds": round(rng.uniform(0.1, 0.8), 2)}) is not RETRY
            elif op < 0.55:
                ok = self.call(client)
            else:
                ok = self.turn(session, thread_id, instance, rng)
            if not ok:
                return
            self.stop.wait(rng.uniform(0.005, 0.05))  # pacing

    def request(self, session: RecordingSession, method: str, params: dict[str, Any]) -> Any:
        """One Session request: its result, or RETRY after a retryable error. ``params`` gets a
        unique ``soakTag`` that the app-server's request log shows if it ever received it."""
        ledger = self.ledger
        with self.lock:
            params["soakTag"] = tag = f"t{next(self.tags)}"
        try:
            req_id, result = session.tracked_request(method, params, timeout=REQUEST_TIMEOUT)
        except BrokerError as exc:
            req_id = getattr(exc, "request_id", None)
            kind = retryable(exc)
            if kind is None:
                ledger.outcome(req_id, f"error: {exc}")
                ledger.problem(f"{method} (id {req_id}) failed with a non-retryable error: {exc!r}")
            else:
                if req_id is None:
                    kind += " (before sending)"
                elif kind == "session_closed":
                    self.unanswered[tag] = (req_id, method, session.instance)
                ledger.outcome(req_id, kind)
                ledger.retry(kind)
            return RETRY
        ledger.outcome(req_id, "response")
        return result

    def echo(self, session: RecordingSession, rng: random.Random) -> bool:
        """A burst of requests, one after the other."""
        for _ in range(rng.randint(1, 20)):
            params: dict[str, Any] = {"n": rng.randrange(1 << 40), "text": "é✓" * rng.randint(0, 50)}
            result = self.request(session, "fake/echo", params)
            if result is RETRY:
                return False
            if result != {"params": params}:
                self.ledger.problem(f"fake/echo answered {result!r} to {params!r}")
        return True

    def call(self, client: BrokerClient) -> bool:
        with self.lock:
            call_id = next(self.call_ids)
            self.calls["sent"] += 1
        params = {"call": call_id}
        try:
            result = client.call("fake/echo", params, timeout=REQUEST_TIMEOUT)
        except BrokerError as exc:
            kind = retryable(exc)
            with self.lock:
                self.calls[kind or "error"] += 1
            if kind is None:
                self.ledger.problem(f"Call {call_id} failed with a non-retryable error: {exc!r}")
            else:
                self.ledger.retry(f"call {kind}")
            return False
        with self.lock:
            self.calls["answered"] += 1
        if result != {"params": params}:
            self.ledger.problem(f"Call {call_id} answered {result!r}")
        return True

    def turn(self, session: RecordingSession, thread_id: str, instance: str, rng: random.Random) -> bool:
        deltas, seconds, approve = rng.randint(5, 40), round(rng.uniform(0.3, 2.5), 2), rng.random() < 0.25
        text = f"deltas={deltas} seconds={seconds}" + (" approve=1" if approve else "")
        result = self.request(session, "turn/start", {"threadId": thread_id,
                                                      "input": [{"type": "text", "text": text}]})
        if result is RETRY:
            return False
        turn_id = result["turn"]["id"]
        key = (instance, turn_id)
        facts: dict[str, Any] = {"deltas": deltas, "approve": approve, "outcome": None, "seen": [], "text": None}
        with self.ledger.lock:
            if key in self.ledger.turns:
                self.ledger.problems.append(f"turn {key} started twice")
            self.ledger.turns[key] = facts

        def on_message(msg: dict[str, Any]) -> None:
            params = msg.get("params") or {}
            if params.get("turnId") != turn_id:
                return
            if msg.get("method") == "item/agentMessage/delta":
                facts["seen"].append(params.get("delta"))
            elif msg.get("method") == "item/completed":
                facts["text"] = (params.get("item") or {}).get("text")

        def on_server_request(msg: dict[str, Any]) -> Any:
            with self.lock:
                self.server_requests += 1
            return {"decision": "accept"}

        try:
            done = session.follow_turn(thread_id, turn_id, timeout=TURN_TIMEOUT, on_message=on_message,
                                       on_server_request=on_server_request)
            facts["outcome"] = done.get("status")
        except SessionClosed as exc:
            facts["outcome"] = "failed"
            facts["why"] = str(exc)
        except CallTimeout as exc:
            facts["outcome"] = "timeout"
            facts["why"] = str(exc)
        facts["ended_at"] = time.monotonic()
        with self.lock:
            self.deltas += len(facts["seen"])
        return bool(facts["outcome"] == "completed")

    # -- the faults -------------------------------------------------------------------------
    def rotator(self) -> None:
        state = WorkspaceState.for_cwd(self.workspace, state_root(os.environ))
        while not self.stop.wait(ROTATE_EVERY):
            before = state.read()
            try:
                b = rotate_broker(self.workspace)
            except BrokerError as exc:
                self.ledger.problem(f"rotate_broker failed: {exc}")
                continue
            if before is not None and b.reason.startswith("rotate"):
                self.draining_since[before.instance_id] = time.monotonic()  # it was asked to drain by now
            self.saw(b)
            self.ledger.count("rotations")

    def killer(self) -> None:
        """SIGKILLs the app-server of the workspace's broker once, while a turn runs on it."""
        if self.stop.wait(LOAD_SECONDS * KILL_AT):
            return
        state = WorkspaceState.for_cwd(self.workspace, state_root(os.environ))
        deadline = time.monotonic() + 20
        while not self.stop.is_set() and time.monotonic() < deadline:
            record = state.read()
            try:
                with BrokerClient(record.endpoint) as client:  # type: ignore[union-attr]
                    st = client.status(timeout=2)
            except (BrokerError, AttributeError):
                self.stop.wait(0.05)
                continue
            if not (st.in_flight_turns and st.app_server_alive and st.state == broker_pb2.BROKER_STATE_SERVING):
                self.stop.wait(0.05)
                continue
            app = psutil.Process(st.app_server_pid)
            # Only the app-server the code under test recorded: child of that broker, our fake.
            assert app.ppid() == st.pid and any(self.marker in part for part in app.cmdline()), app
            os.kill(st.app_server_pid, signal.SIGKILL)
            self.kill_time = time.monotonic()
            self.killed_instance = st.instance_id
            self.kill_facts = {"broker_pid": st.pid, "app_server_pid": st.app_server_pid,
                               "turns_in_flight": len(st.in_flight_turns), "pending_requests": st.pending_requests,
                               "at_seconds": round(time.monotonic() - self.started, 1)}
            self.ledger.count("faults:app_server_sigkill")
            return
        self.ledger.problem("no moment with a turn in flight to kill the app-server in")

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> float:
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.guarded, args=(f"client {n}", self.client, n), name=f"soak-client-{n}")
                   for n in range(CLIENTS)]
        threads += [threading.Thread(target=self.guarded, args=("rotator", self.rotator), name="soak-rotator"),
                    threading.Thread(target=self.guarded, args=("killer", self.killer), name="soak-killer")]
        for t in threads:
            t.start()
        self.stop.wait(LOAD_SECONDS)
        self.stop.set()
        for t in threads:
            t.join(TURN_TIMEOUT + REQUEST_TIMEOUT)
            if t.is_alive():
                self.ledger.problem(f"{t.name} still running {TURN_TIMEOUT + REQUEST_TIMEOUT:g} s after the stop")
        return time.monotonic() - self.started


def account(soak: Soak) -> dict[str, Any]:
    """Requests, turns and duplicates, from the ledger; problems are appended to it."""
    ledger = soak.ledger
    outcomes = collections.Counter(str(entry["outcome"]) for entry in ledger.sent.values())
    for req_id, entry in ledger.sent.items():
        got = ledger.responses.get(req_id, 0)
        # A SessionClosed means no response came; anything else (a result, the draining error,
        # the app-server-exited error) is a response, and exactly one.
        wanted = 0 if entry["outcome"] == "session_closed" else 1
        if entry["outcome"] is None:
            ledger.problems.append(f"request {req_id} {entry['method']} has no outcome (lost)")
        elif got != wanted:
            ledger.problems.append(f"request {req_id} {entry['method']}: {got} responses, outcome {entry['outcome']}")
    duplicates = sum(n - 1 for n in ledger.responses.values() if n > 1)
    # A request that got SessionClosed after it was sent must not have reached the app-server:
    # otherwise it ran, its response was dropped, and the client's retry runs it twice.
    executed = executed_tags(soak.request_log)
    for tag, (req_id, method, instance) in soak.unanswered.items():
        if tag in executed:
            ledger.problems.append(f"request {req_id} {method} on broker {instance} reached the app-server, "
                                   f"but the client got SessionClosed instead of its response")

    turns = collections.Counter[str]()
    lost = 0
    watcher_latency = 0.0
    for key, facts in ledger.turns.items():
        instance, _ = key
        outcome = facts["outcome"]
        completions = ledger.turn_completed.get(key, 0)
        if outcome == "completed":
            expected = (["decision=accept "] if facts["approve"] else []) + [f"w{i} " for i in range(facts["deltas"])]
            if facts["seen"] != expected or facts["text"] != "".join(expected):
                ledger.problems.append(f"turn {key} completed with deltas {facts['seen']} and text {facts['text']!r}, "
                                       f"expected {expected}")
                turns["corrupted"] += 1
            else:
                turns["completed"] += 1
                if facts["ended_at"] > soak.draining_since.get(instance, float("inf")):
                    turns["completed_on_a_draining_broker"] += 1
            if completions != 1:
                ledger.problems.append(f"turn {key}: {completions} turn/completed")
        elif outcome == "interrupted":
            turns["interrupted"] += 1
        elif outcome == "failed" and instance == soak.killed_instance:
            turns["failed_by_kill"] += 1
            # A watcher never hangs: it hears of the app-server's death within a second.
            latency = facts["ended_at"] - soak.kill_time
            watcher_latency = max(watcher_latency, latency)
            if latency > WATCHER_DEADLINE:
                ledger.problems.append(f"turn {key}: its watcher heard of the kill only after {latency:.2f} s")
        else:
            lost += 1
            ledger.problems.append(f"turn {key} lost: {outcome} ({facts.get('why', '')}) on broker {instance}"
                                   f"{' (the killed one)' if instance == soak.killed_instance else ''}")
    for key, n in ledger.turn_completed.items():
        if key not in ledger.turns:
            ledger.problems.append(f"turn/completed for a turn nobody started here: {key}")
        duplicates += max(0, n - 1)
    return {"outcomes": dict(outcomes), "turns": dict(turns), "lost": lost, "duplicates": duplicates,
            "watcher_latency": round(watcher_latency, 3)}


def executed_tags(path: Path) -> set[str]:
    """The soakTags of every request the app-servers received (FAKE_LOG_REQUESTS)."""
    tags = set()
    for line in path.read_bytes().splitlines() if path.exists() else ():
        try:
            params = json.loads(line).get("params")
        except (ValueError, AttributeError):
            continue
        if isinstance(params, dict) and isinstance(params.get("soakTag"), str):
            tags.add(params["soakTag"])
    return tags


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1)}


def settle(measure: Any, ok: Any, timeout: float) -> Any:
    """Measures until the value is acceptable or the time is up; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if ok(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


def children() -> set[int]:
    """Live child processes of the test process (a zombie or one just gone does not count)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def stop_workspace_broker(workspace: Path) -> None:
    """Stops the workspace's broker the way a user would: ``codex-broker stop`` (graceful)."""
    assert cli.main(["stop", "--cwd", str(workspace), "--timeout", "60"]) == 0


@pytest.mark.timeout(300)
def test_soak_rotations_and_an_app_server_kill_lose_and_duplicate_nothing(tmp_path, monkeypatch, capsys):
    marker = new_marker()
    state_dir, runtime_dir, workspace = short_dir("cxbs"), short_dir("cxbr"), tmp_path / "ws"
    workspace.mkdir()
    monkeypatch.setenv("CODEX_BROKER_STATE_DIR", state_dir)
    monkeypatch.setenv("CODEX_BROKER_RUNTIME_DIR", runtime_dir)
    monkeypatch.setenv("CODEX_BROKER_APP_SERVER", fake_command(marker=marker))
    request_log = tmp_path / "app-server-stdin.jsonl"  # every app-server appends what it receives
    monkeypatch.setenv("FAKE_LOG_REQUESTS", str(request_log))
    monkeypatch.delenv("CODEX_BROKER_MAX_AGE_HOURS", raising=False)
    monkeypatch.delenv("CODEX_COMPANION_BROKER_MAX_AGE_HOURS", raising=False)
    began = time.monotonic()
    soak: Soak | None = None
    try:
        # Warm-up: grpc and the state directory have what they keep for the process's life.
        warm = ensure_broker(workspace)
        with warm.client() as client:
            assert client.call("thread/loaded/list") == {"data": [], "nextCursor": None}
            broker_fds_fresh = psutil.Process(warm.pid).num_fds()  # served one Call, one client connected
        stop_workspace_broker(workspace)
        wait_for(lambda: not processes_with(marker), 30, "the warm-up broker to exit")
        fds_before, threads_before, children_before = len(open_fds()), threading.active_count(), children()
        state = WorkspaceState.for_cwd(workspace, state_root(os.environ))

        soak = Soak(workspace, marker, request_log)
        verdicts = Verdicts()
        logger = logging.getLogger("codex_broker.lifecycle")
        logger.addHandler(verdicts)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            load = soak.run()
        finally:
            logger.removeHandler(verdicts)
            logger.setLevel(level)
        figures = account(soak)

        # Rotated brokers finish their turns and exit by themselves; then stop the last one,
        # once every client has gone and it holds no more descriptors than a fresh broker.
        current = state.read()
        assert current is not None
        broker_fds_after = settle(lambda: psutil.Process(current.pid).num_fds(),
                                  lambda n: n <= broker_fds_fresh, 15)
        old = {i: pc for i, pc in soak.brokers.items() if i != current.instance_id}
        for instance, (pid, created) in old.items():
            if created is not None and not identity.wait_gone(pid, created, 30):
                soak.ledger.problem(f"rotated broker {pid} ({instance}) still running 30 s after the load")
        stop_workspace_broker(workspace)
        survivors = settle(lambda: processes_with(marker), lambda procs: not procs, 30)
        fds_after = settle(lambda: len(open_fds()), lambda n: n <= fds_before, 15)
        threads_after = settle(threading.active_count, lambda n: n <= threads_before, 15)
        leaked_children = children() - children_before
        runtime_left = os.listdir(runtime_dir)
        state_left = sorted(set(os.listdir(state.path)) - {"logs", "history.jsonl"})
        root_left = sorted(os.listdir(state_dir))
        leaks = {"processes": len(survivors) + len(leaked_children), "fds": max(0, fds_after - fds_before),
                 "broker_fds": max(0, broker_fds_after - broker_fds_fresh),
                 "threads": max(0, threads_after - threads_before),
                 "files": len(runtime_left) + len(set(state_left) - {"lock"}) + len(set(root_left) - {"workspaces"})}
        ledger = soak.ledger
        report = {
            "duration_seconds": round(time.monotonic() - began, 1), "load_seconds": round(load, 1),
            "clients": CLIENTS,
            "requests": {"session_requests": len(ledger.sent), "calls": soak.calls["sent"],
                         "session_closed_after_sending": len(soak.unanswered),
                         "answered": figures["outcomes"].get("response", 0) + soak.calls["answered"],
                         "retryable_errors": dict(ledger.retryable), "outcomes": figures["outcomes"]},
            "turns": {"started": len(ledger.turns), **figures["turns"], "deltas_received": soak.deltas,
                      "approvals_answered": soak.server_requests},
            "rotations": ledger.events["rotations"],
            "faults_injected": {"rotations": ledger.events["rotations"],
                                "app_server_sigkill": ledger.events["faults:app_server_sigkill"], **soak.kill_facts,
                                "watchers_told_within_seconds": figures["watcher_latency"]},
            "brokers": len(soak.brokers) + 1,  # + the warm-up broker
            "ensure_verdicts": {k.split(":", 1)[1]: v for k, v in ledger.events.items() if k.startswith("ensure:")},
            "lifecycle_decisions": dict(verdicts.seen),
            "lost": figures["lost"], "duplicates": figures["duplicates"], "leaks": leaks,
            "leak_detail": {"fds_before": fds_before, "fds_after": fds_after, "threads_before": threads_before,
                            "broker_fds_fresh": broker_fds_fresh, "broker_fds_after_load": broker_fds_after,
                            "threads_after": threads_after, "runtime_dir": runtime_left, "state_dir": state_left},
            "problems": len(ledger.problems), "problem_samples": ledger.problems[:10], "machine": machine(),
        }
        text = json.dumps(report, indent=2, sort_keys=True)
        with capsys.disabled():
            print(f"\nsoak figures:\n{text}")
        if os.environ.get("SOAK_REPORT"):
            Path(os.environ["SOAK_REPORT"]).write_text(text + "\n")

        assert not ledger.problems, f"{len(ledger.problems)} problems:\n" + "\n".join(ledger.problems[:40])
        assert report["lost"] == 0 and report["duplicates"] == 0
        assert leaks == {"processes": 0, "fds": 0, "broker_fds": 0, "threads": 0, "files": 0}, (
            leaks, report["leak_detail"])
        assert state_left == ["lock"] and root_left == ["workspaces"] and runtime_left == []
        assert report["faults_injected"]["app_server_sigkill"] == 1
        assert report["rotations"] >= LOAD_SECONDS / ROTATE_EVERY / 2, "the rotator fell behind"
        assert figures["turns"].get("completed", 0) > 0 and report["requests"]["answered"] > 0
    finally:
        if soak is not None:  # after a failure: stop what is left, by the pids ensure recorded
            for pid, created in soak.brokers.values():
                if created is not None and identity.is_same_process(pid, created):
                    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                        identity.signal_verified(pid, created, sig, group=sig == signal.SIGKILL)
                        if identity.wait_gone(pid, created, 10):
                            break
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def hammer(endpoint: str, prefix: str, failed: list[tuple[str, int | None, str]],
           answered: threading.Barrier) -> None:
    """Sends fake/echo requests one after the other on one Session until one fails; records it."""
    with BrokerClient(endpoint) as broker_client:
        session = RecordingSession(broker_client.channel, Ledger(), prefix)
        try:
            for seq in itertools.count():
                tag = f"{prefix}-{seq}"
                try:
                    session.tracked_request("fake/echo", {"soakTag": tag}, timeout=REQUEST_TIMEOUT)
                except BrokerError as exc:
                    failed.append((tag, getattr(exc, "request_id", None), str(exc)))
                    return
                if seq == 0:
                    answered.wait(WAIT)
        finally:
            session.close()


def test_drain_under_request_load_never_drops_a_response_the_app_server_produced(tmp_path):
    """Clients keep sending reads (allowed while draining) when a broker with no turns is
    drained, so it stops between two requests. A request may race the end of its Session (then
    it must not have reached the app-server: a retry is safe), but a request the broker did
    forward must get its response: otherwise it ran, the client saw only SessionClosed, and
    its retry runs it a second time. Several rounds, since the window is a race."""
    violations: list[str] = []
    pending_at_end = 0
    for round_ in range(8):
        log = tmp_path / f"app-server-stdin-{round_}.jsonl"
        b = serve(env={"FAKE_LOG_REQUESTS": str(log)}, log_path=tmp_path / f"broker-{round_}.log")
        failed: list[tuple[str, int | None, str]] = []
        answered = threading.Barrier(5)
        threads = [threading.Thread(target=hammer, args=(b.endpoint, f"{round_}-{n}", failed, answered))
                   for n in range(4)]
        try:
            for t in threads:
                t.start()
            answered.wait(WAIT)  # every client has had an answer: the load is on
            broker_pb2_grpc.BrokerStub(b.channel).Drain(broker_pb2.DrainRequest(reason="test"), timeout=5)
            assert b.proc.wait(WAIT) == 0, b.tail()
            for t in threads:
                t.join(WAIT)
                assert not t.is_alive(), "a client hung after its broker stopped"
        finally:
            problems = b.stop()
        assert not problems, problems
        executed = executed_tags(log)
        for tag, req_id, error in failed:
            pending_at_end += req_id is not None and "ended" in error  # SessionClosed, no response
            if req_id is not None and tag in executed:
                violations.append(f"round {round_}: request {tag} reached the app-server, yet the client got "
                                  f"{error!r} instead of its response")
    print(f"{pending_at_end} Sessions ended with a request pending; {len(violations)} requests ran unanswered")
    assert not violations, "\n".join(violations)
