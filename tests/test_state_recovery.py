"""ensure_broker recovers from a broken or stale ``broker.json`` and says what it found.

- A record that cannot be read (truncated, empty, not UTF-8, wrong shape, a pid of 0 or -1) is
  moved aside, logged, and treated as missing: a new broker is spawned, and the broker the record
  used to name is never signalled (nothing identifies it any more); ``gc`` then retires it.
- A record naming a live broker whose socket file was deleted: Health is unreachable, identity
  (pid + create time) still holds, so the broker counts as wedged: it and its app-server are
  killed, its session directory removed, and a new broker spawned.
- A record naming a dead broker, or a pid recycled by another process: cleaned, never signalled.

Real brokers (spawned by ensure_broker) in front of the fake app-server; the lifecycle log is
captured on the ``codex_broker.lifecycle`` logger."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import fake_command, new_marker, processes_with, short_dir, wait_for, wait_gone

from lifecycle import identity
from lifecycle.client import BrokerClient
from lifecycle.ensure import BrokerSession, ensure_broker
from lifecycle.gc import collect
from lifecycle.state import WorkspaceState, state_root

LOGGER = "codex_broker.lifecycle"


@dataclass
class Workspace:
    path: Path
    state_dir: str
    runtime_dir: str
    marker: str
    brokers: list[BrokerSession] = field(default_factory=list)

    def ensure(self) -> BrokerSession:
        b = ensure_broker(self.path)
        self.brokers.append(b)
        return b

    @property
    def state(self) -> WorkspaceState:
        return WorkspaceState.for_cwd(self.path, state_root(os.environ))

    @property
    def record_path(self) -> Path:
        return self.state.record_path

    def corrupt_files(self) -> list[Path]:
        return sorted(self.state.path.glob("broker.json.corrupt-*"))


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """A workspace with its own state and runtime dirs and the fake app-server; at teardown
    every broker it saw is drained (killed only by its recorded pid if it does not exit) and
    the test fails if any process of it is left."""
    marker = new_marker()
    ws = Workspace(path=tmp_path / "ws", state_dir=short_dir("cxbs"), runtime_dir=short_dir("cxbr"), marker=marker)
    ws.path.mkdir()
    monkeypatch.setenv("CODEX_BROKER_STATE_DIR", ws.state_dir)
    monkeypatch.setenv("CODEX_BROKER_RUNTIME_DIR", ws.runtime_dir)
    monkeypatch.setenv("CODEX_BROKER_APP_SERVER", fake_command(marker=marker))
    try:
        yield ws
    finally:
        for b in ws.brokers:
            created = identity.process_create_time(b.pid)
            if created is None:
                continue
            try:
                with BrokerClient(b.endpoint) as client:
                    client.drain(0.0, reason="test over", timeout=2.0)
            except Exception:
                pass
            if not identity.wait_gone(b.pid, created, 15):
                identity.signal_verified(b.pid, created, signal.SIGKILL, group=True)
        left = wait_gone(processes_with(marker), 15)
        shutil.rmtree(ws.state_dir, ignore_errors=True)
        shutil.rmtree(ws.runtime_dir, ignore_errors=True)
        assert not left, f"processes left behind: {[p.pid for p in left]}"


@pytest.fixture
def lifecycle_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on the lifecycle logger, even if something set it not to propagate."""
    logger = logging.getLogger(LOGGER)
    caplog.set_level(logging.INFO, logger=LOGGER)
    if not logger.propagate:
        logger.addHandler(caplog.handler)
        yield caplog
        logger.removeHandler(caplog.handler)
    else:
        yield caplog


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def serving(b: BrokerSession) -> bool:
    with BrokerClient(b.endpoint) as client:
        return client.health() == "SERVING"


def assert_replaced(ws: Workspace, old: BrokerSession, new: BrokerSession) -> None:
    assert new.instance_id != old.instance_id and new.pid != old.pid and new.endpoint != old.endpoint
    assert not new.reused
    assert serving(new)
    record = ws.state.read()
    assert record is not None and record.instance_id == new.instance_id
    leftovers = [p.name for p in ws.state.path.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def retire_orphan(ws: Workspace, old: BrokerSession) -> None:
    """The broker the unreadable record named is still running (nothing may signal it without
    identity); ``gc`` finds it as an orphan and drains it, and it exits by itself."""
    created = identity.process_create_time(old.pid)
    assert created is not None, "the broker of the unreadable record was stopped without identity"
    report = collect({**os.environ, "CODEX_BROKER_SPAWN_TIMEOUT": "0"})  # it is young: not "still starting"
    assert any(f"orphaned broker pid {old.pid}" in action for action in report["actions"]), report
    assert identity.wait_gone(old.pid, created, 15), "the orphaned broker did not exit after gc drained it"


CORRUPTIONS = {
    "truncated": (lambda text: text[: len(text) // 2].encode(), "invalid JSON"),
    "empty": (lambda text: b"", "empty file, 0 bytes"),
    "not-utf8": (lambda text: b"\xff\xfe" + text.encode(), "invalid JSON"),
    "wrong-shape": (lambda text: json.dumps([json.loads(text)]).encode(), "wrong shape: expected a JSON object"),
    "missing-field": (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "endpoint"}
                                              ).encode(), "missing field 'endpoint'"),
    "pid-0": (lambda text: json.dumps({**json.loads(text), "pid": 0}).encode(), "'pid' must be a positive integer"),
    "pid-minus-1": (lambda text: json.dumps({**json.loads(text), "pid": -1}).encode(),
                    "'pid' must be a positive integer"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_unreadable_record_is_moved_aside_logged_and_replaced(workspace, lifecycle_log, kind):
    corrupt, what = CORRUPTIONS[kind]
    old = workspace.ensure()
    original = workspace.record_path.read_text()
    damaged = corrupt(original)
    workspace.record_path.write_bytes(damaged)

    new = workspace.ensure()

    assert_replaced(workspace, old, new)
    assert new.verdict == "none", new
    assert "none: broker record was corrupt" in messages(lifecycle_log), messages(lifecycle_log)
    warnings = [m for m in messages(lifecycle_log, logging.WARNING) if "was corrupt" in m]
    assert len(warnings) == 1 and what in warnings[0] and "moved aside to" in warnings[0], warnings
    moved = workspace.corrupt_files()
    assert len(moved) == 1 and moved[0].read_bytes() == damaged, "the damaged record was not kept for inspection"
    assert str(moved[0]) in warnings[0]
    retire_orphan(workspace, old)


def test_record_naming_a_deleted_socket_is_wedged_killed_and_replaced(workspace, lifecycle_log):
    old = workspace.ensure()
    record = workspace.state.read()
    assert record is not None and record.app_server_pid
    app_created = record.app_server_create_time
    assert app_created is not None
    sock = old.endpoint.removeprefix("unix:")
    os.unlink(sock)  # the broker keeps running, but nobody can reach it any more

    new = workspace.ensure()

    assert_replaced(workspace, old, new)
    assert new.verdict == "wedged", new
    found = [m for m in messages(lifecycle_log) if m.startswith("wedged:")]
    assert len(found) == 1 and re.fullmatch(r"wedged: no answer in [\d.]+ s over \d+ attempts", found[0]), found
    assert not identity.is_same_process(old.pid, record.create_time), "the unreachable broker is still running"
    assert not identity.is_same_process(record.app_server_pid, app_created), "its app-server is still running"
    assert not os.path.exists(record.session_dir), "its session directory was not removed"
    history = workspace.state.history()
    assert history[-1].old_pid == old.pid and history[-1].new_pid == new.pid
    assert history[-1].reason.startswith("wedged:")


def test_a_broker_that_exits_while_it_is_probed_is_dead_not_wedged(workspace, lifecycle_log):
    """A broker stopping by itself (its app-server died) removes its socket a moment before it
    exits; a client that re-ensures in between finds it alive and unreachable. Here its socket
    is removed and, once the probe has reported a second of silence, the broker is killed: the
    probe ends there and the verdict is dead (recorded as such), not wedged after the whole
    wedge window."""
    old = workspace.ensure()
    record = workspace.state.read()
    assert record is not None
    os.unlink(old.endpoint.removeprefix("unix:"))  # alive, and nobody can reach it
    told: list[str] = []

    def progress(message: str) -> None:
        if not told:  # the probe has tried for a second: now the broker exits
            assert identity.signal_verified(old.pid, record.create_time, signal.SIGKILL)
        told.append(message)

    new = ensure_broker(workspace.path, progress=progress)
    workspace.brokers.append(new)

    assert told, "the probe never reported its wait"
    assert_replaced(workspace, old, new)
    assert new.verdict == "dead", new
    decisions = messages(lifecycle_log)
    assert not any(m.startswith("wedged:") for m in decisions), decisions
    assert workspace.state.history()[-1].reason.startswith("dead:")
    assert not os.path.exists(record.session_dir), "its session directory was not removed"


def test_record_naming_a_dead_broker_is_cleaned_and_replaced(workspace, lifecycle_log):
    old = workspace.ensure()
    record = workspace.state.read()
    assert record is not None
    assert identity.signal_verified(old.pid, record.create_time, signal.SIGKILL)  # the recorded pid
    assert identity.wait_gone(old.pid, record.create_time, 10)
    assert record.app_server_pid and record.app_server_create_time
    wait_for(lambda: not identity.is_same_process(record.app_server_pid, record.app_server_create_time),
             10, "the app-server to die with its broker (parent-death signal)")
    assert os.path.isdir(record.session_dir)  # a killed broker cleans nothing

    new = workspace.ensure()

    assert_replaced(workspace, old, new)
    assert new.verdict == "dead" and "recorded pid is gone" in new.reason, new
    assert any(m.startswith("dead: recorded pid is gone") for m in messages(lifecycle_log))
    assert not os.path.exists(record.session_dir), "the dead broker's session directory was not removed"


def test_record_naming_a_recycled_pid_is_replaced_and_that_process_is_never_signalled(workspace, lifecycle_log):
    old = workspace.ensure()
    stranger = subprocess.Popen(["sleep", "120"])  # stands in for a process that reused the pid
    try:
        data = json.loads(workspace.record_path.read_text())
        data["pid"] = stranger.pid  # its create time is not the recorded one
        workspace.record_path.write_text(json.dumps(data))

        new = workspace.ensure()

        assert_replaced(workspace, old, new)
        assert new.verdict == "dead" and "recycled" in new.reason, new
        assert any("recycled" in m for m in messages(lifecycle_log))
        assert stranger.poll() is None, "the process that reused the pid was signalled"
    finally:
        stranger.kill()
        stranger.wait()
    retire_orphan(workspace, old)
