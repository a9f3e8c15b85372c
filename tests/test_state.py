"""Per-workspace state files: atomic writes, corrupt files moved aside, history capped."""

from __future__ import annotations

import dataclasses
import json
import logging
import stat
import sys
from pathlib import Path

import pytest

from lifecycle.state import (
    HISTORY_LIMIT,
    BrokerRecord,
    HistoryEntry,
    WorkspaceState,
    state_root,
    workspace_key,
)


def make_record(instance_id: str = "inst-1", **changes: object) -> BrokerRecord:
    base = BrokerRecord(
        endpoint="unix:/tmp/cb-x/s.sock",
        pid=4242,
        create_time=1_700_000_000.25,
        instance_id=instance_id,
        started_at=1_700_000_001.0,
        session_dir="/tmp/cb-x",
        log_file="/tmp/cb-x/broker.log",
        version="0.1.0",
        app_server_command=["codex", "app-server"],
        codex_home="/home/u/.codex",
        cwd="/home/u/proj",
        app_server_pid=4243,
        app_server_create_time=1_700_000_000.5,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def ws(tmp_path: Path) -> WorkspaceState:
    return WorkspaceState.for_cwd(tmp_path / "proj", root=tmp_path / "state")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_then_read_round_trips_with_private_modes(ws: WorkspaceState) -> None:
    record = make_record()
    ws.write(record)
    assert ws.read() == record
    assert _mode(ws.record_path) == 0o600
    assert _mode(ws.path) == 0o700
    assert [p.name for p in ws.path.iterdir()] == ["broker.json"]  # no temp file left behind


def test_optional_app_server_fields_may_be_null(ws: WorkspaceState) -> None:
    record = make_record(app_server_pid=None, app_server_create_time=None)
    ws.write(record)
    assert ws.read() == record


def test_missing_record_reads_as_none(ws: WorkspaceState) -> None:
    assert ws.read() is None


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = make_record().to_json() | {"added_later": 1}
    assert BrokerRecord.from_json(data) == make_record()


def _valid_json() -> dict[str, object]:
    return make_record().to_json()


CORRUPT = [
    pytest.param(b"", "empty file", id="empty"),
    pytest.param(b"  \n", "empty file", id="whitespace-only"),
    pytest.param(json.dumps(_valid_json()).encode()[:40], "invalid JSON", id="truncated-json"),
    pytest.param(b"\xff\xfe garbage", "invalid JSON", id="not-utf8"),
    pytest.param(b"[1, 2]", "wrong shape", id="not-an-object"),
    pytest.param(json.dumps(_valid_json() | {"pid": "4242"}).encode(), "'pid'", id="pid-as-string"),
    pytest.param(json.dumps(_valid_json() | {"pid": 0}).encode(), "'pid'", id="pid-zero"),
    pytest.param(json.dumps(_valid_json() | {"pid": True}).encode(), "'pid'", id="pid-bool"),
    pytest.param(
        json.dumps(_valid_json() | {"app_server_command": "codex"}).encode(),
        "app_server_command",
        id="command-not-a-list",
    ),
    pytest.param(
        json.dumps({k: v for k, v in _valid_json().items() if k != "instance_id"}).encode(),
        "instance_id",
        id="missing-field",
    ),
]


@pytest.mark.parametrize(("content", "described"), CORRUPT)
def test_corrupt_record_is_moved_aside_logged_and_read_as_none(
    ws: WorkspaceState, caplog: pytest.LogCaptureFixture, content: bytes, described: str
) -> None:
    ws.record_path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="codex_broker.lifecycle"):
        assert ws.read() is None
    assert not ws.record_path.exists()
    aside = list(ws.path.glob("broker.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    messages = [r.getMessage() for r in caplog.records if r.name == "codex_broker.lifecycle"]
    assert len(messages) == 1 and described in messages[0] and str(aside[0]) in messages[0]


def test_from_json_rejects_wrong_shape_with_value_error() -> None:
    with pytest.raises(ValueError, match="create_time"):
        BrokerRecord.from_json(_valid_json() | {"create_time": "yesterday"})


def test_clear_removes_only_the_matching_instance(ws: WorkspaceState) -> None:
    ws.write(make_record("newer"))
    assert ws.clear(make_record("older")) is False
    assert ws.read() == make_record("newer")
    assert ws.clear(make_record("newer")) is True
    assert ws.read() is None
    assert ws.clear(make_record("newer")) is False


def test_history_keeps_the_last_fifty_entries_in_order(ws: WorkspaceState) -> None:
    assert ws.history() == []
    for i in range(HISTORY_LIMIT + 7):
        ws.append_history(HistoryEntry(at=float(i), reason=f"aged {i}", old_pid=i, new_pid=i + 1))
    entries = ws.history()
    assert HISTORY_LIMIT == 50
    assert len(entries) == HISTORY_LIMIT
    assert entries[0].reason == "aged 7" and entries[-1].reason == f"aged {HISTORY_LIMIT + 6}"
    assert _mode(ws.history_path) == 0o600


def test_history_entry_has_the_documented_fields(ws: WorkspaceState) -> None:
    entry = HistoryEntry(
        at=1.5, reason="mismatched", old_instance="a", new_instance="b", old_pid=1, new_pid=2
    )
    ws.append_history(entry)
    line = json.loads(ws.history_path.read_text().splitlines()[0])
    assert set(line) == {"at", "reason", "old_instance", "new_instance", "old_pid", "new_pid"}
    assert ws.history() == [entry]


def test_lock_is_exclusive_between_holders(ws: WorkspaceState) -> None:
    import filelock

    with ws.lock():
        with pytest.raises(filelock.Timeout):
            ws.lock(timeout=0.05).acquire()
    with ws.lock(timeout=0.05):
        pass


def test_workspace_key_is_readable_and_stable(tmp_path: Path) -> None:
    proj = tmp_path / "My Project"
    proj.mkdir()
    key = workspace_key(proj)
    assert key.startswith("my-project-")
    assert len(key.rsplit("-", 1)[1]) == 12
    assert workspace_key(str(proj)) == key


def test_workspace_key_follows_symlinks_and_separates_same_names(tmp_path: Path) -> None:
    (tmp_path / "a" / "proj").mkdir(parents=True)
    (tmp_path / "b" / "proj").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a" / "proj")
    assert workspace_key(link) == workspace_key(tmp_path / "a" / "proj")
    assert workspace_key(tmp_path / "a" / "proj") != workspace_key(tmp_path / "b" / "proj")


def test_state_root_honors_env_and_creates_private_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wanted = tmp_path / "custom" / "state"
    monkeypatch.setenv("CODEX_BROKER_STATE_DIR", str(wanted))
    assert state_root() == wanted
    assert wanted.is_dir() and _mode(wanted) == 0o700
    assert state_root({"CODEX_BROKER_STATE_DIR": str(tmp_path / "other")}) == tmp_path / "other"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_STATE_HOME is a Linux convention")
def test_state_root_defaults_to_user_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    root = state_root({})
    assert root.name == "codex-broker" and root.is_dir()
    assert root == tmp_path / "xdg" / "codex-broker"
