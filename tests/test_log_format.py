"""--log-format json and --log-level, on the command line and through the environment (which
brokers the lifecycle spawns inherit)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import run_serve
from lifecycle_support import World, world_for


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def json_records(text: str) -> list[dict]:
    """Every line of a log, each of which must be one JSON object with time, level and event."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # fails on any line that is not JSON (a raw stderr line)
        assert isinstance(record, dict) and {"time", "level", "event"} <= record.keys(), line
        records.append(record)
    return records


def test_json_log_carries_app_server_stderr_lines_inside_records(broker):
    b = broker("--log-format", "json")
    b.call("fake/stderr", {"text": '{"raw": "stderr line"}\nplain words\n'})
    ready = b.status()
    assert not b.stop()

    records = json_records(b.log())
    stderr_lines = [r["line"] for r in records if r["event"] == "app-server stderr"]
    assert stderr_lines == ['{"raw": "stderr line"}', "plain words"]
    assert [r["level"] for r in records if r["event"] == "app-server stderr"] == ["info", "info"]
    (up,) = [r for r in records if r["event"] == "ready"]
    assert up["endpoint"] == b.endpoint and up["instance"] == ready.instance_id
    assert [r["exit_code"] for r in records if r["event"] == "stopped"] == [0]


def test_log_format_and_level_from_the_environment(broker):
    b = broker(env={"CODEX_BROKER_LOG_FORMAT": "json", "CODEX_BROKER_LOG_LEVEL": "warning"})
    b.call("fake/garbage", {"kind": "array"})  # the broker warns about the skipped line
    b.call("fake/stderr", {"text": "an info record\n"})
    assert not b.stop()

    records = json_records(b.log())
    assert [r["level"] for r in records] == ["warning"], records
    assert "app-server line skipped" in records[0]["event"]


def test_log_level_flag_wins_over_the_environment_in_text_format(broker):
    b = broker("--log-level", "error", env={"CODEX_BROKER_LOG_LEVEL": "debug"})
    b.call("fake/garbage", {"kind": "array"})  # a warning: below error
    assert not b.stop()
    assert b.log() == ""


@pytest.mark.parametrize("name,value", [("CODEX_BROKER_LOG_FORMAT", "xml"), ("CODEX_BROKER_LOG_LEVEL", "loud")])
def test_a_bad_log_variable_is_refused_with_exit_2(tmp_path, name, value):
    result = run_serve("--endpoint", f"unix:{tmp_path}/d/s.sock", "--app-server", "true", env={name: value})
    assert result.returncode == 2
    assert f"{name}={value!r} is not one of" in result.stderr


def test_a_spawned_broker_logs_json_when_its_spawner_says_so(world: World) -> None:
    session = world.ensure(env=world.env_with(CODEX_BROKER_LOG_FORMAT="json"))
    text = Path(session.log_file).read_text()
    records = json_records(text)
    # written before the broker listens, so before ensure could find it SERVING
    assert any(r["event"].startswith("starting version=") for r in records), text
