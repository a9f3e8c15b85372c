"""A workspace whose path is not valid UTF-8 gets a broker like any other.

Such a path is a ``str`` with surrogate escapes in Python; it travels through argv (the
broker's ``--cwd`` and the app-server's working directory), the state files (JSON escapes),
the broker's Status (``proxy.text.proto_text``: ``\\xNN`` for each undecodable byte), logs
and the CLI's output. Before, every ensure failed: the broker's Status raised
UnicodeEncodeError while serializing its cwd."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from lifecycle_support import World, world_for

from lifecycle.client import BrokerClient
from proxy.text import proto_text

ODD_NAME = b"ws-\xff\xfe-caf\xc3\xa9"  # two undecodable bytes, then a valid "é"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


@pytest.fixture
def odd_workspace(tmp_path: Path) -> Path:
    path = os.path.join(os.fsencode(tmp_path), ODD_NAME)
    os.mkdir(path)
    return Path(os.fsdecode(path))


def test_a_workspace_whose_path_is_not_utf8_gets_a_broker_and_reuses_it(world: World, odd_workspace: Path) -> None:
    first = world.ensure(workspace=odd_workspace)
    second = world.ensure(workspace=odd_workspace)

    assert first.verdict == "none" and second.verdict == "live" and second.pid == first.pid
    assert first.cwd == os.path.realpath(odd_workspace)
    record = world.record(odd_workspace)
    assert record is not None and record.cwd == first.cwd  # the state file keeps the exact path
    with BrokerClient(first.endpoint) as client:
        status = client.status()
        assert client.health() == "SERVING"
    assert status.cwd == proto_text(first.cwd) and status.cwd.endswith("ws-\\xff\\xfe-café")
    # argv carried the exact bytes: the app-server runs in the odd directory itself
    assert os.fsencode(psutil.Process(status.app_server_pid).cwd()) == os.fsencode(first.cwd)
    assert "Traceback" not in Path(first.log_file).read_text(errors="replace")


def test_the_cli_serves_a_workspace_whose_path_is_not_utf8(world: World, odd_workspace: Path) -> None:
    where = ("--cwd", os.fsencode(odd_workspace).decode("utf-8", "surrogateescape"))

    ensured = world.cli("ensure", "--json", *where)
    assert ensured.returncode == 0, ensured
    data = json.loads(ensured.stdout)
    assert data["cwd"] == os.path.realpath(odd_workspace) and data["verdict"] == "none"

    status = world.cli("status", *where)
    assert status.returncode == 0, status
    assert "ws-\\xff\\xfe-café" in status.stdout
    as_json = world.cli("status", "--json", *where)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["pid"] == data["pid"], as_json
    assert world.cli("health", *where).returncode == 0
    assert world.cli("ensure", *where).stdout.strip().endswith(f"pid {data['pid']} reused")
    stopped = world.cli("stop", *where)
    assert stopped.returncode == 0, stopped
    assert world.brokers() == []


@pytest.mark.parametrize(("text", "shown"), [
    ("plain/path", "plain/path"),
    ("caf\u00e9 \u2603", "caf\u00e9 \u2603"),
    (os.fsdecode(b"/a/\xff/b"), "/a/\\xff/b"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
    ("", ""),
])
def test_proto_text_keeps_valid_text_and_escapes_what_protobuf_cannot_carry(text: str, shown: str) -> None:
    assert proto_text(text) == shown
    shown.encode("utf-8")
