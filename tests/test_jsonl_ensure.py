"""Brokers started by ``ensure`` serve JSONL too: ``ensure --json`` and the record name the JSONL
socket, beside the gRPC one in the session directory, and it serves Sessions; a drain removes it."""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import JsonlSession
from lifecycle_support import World, world_for

from lifecycle.state import BrokerRecord
from proxy import contract


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def test_ensure_json_and_the_record_name_a_jsonl_socket_beside_the_grpc_one_that_serves(world: World) -> None:
    result = world.cli("ensure", "--json")
    assert result.returncode == 0, result
    data = json.loads(result.stdout)
    record = world.record()
    assert record is not None
    assert data["jsonl_endpoint"] == record.jsonl_endpoint
    path = contract.parse_unix_endpoint(record.jsonl_endpoint)
    assert path == os.path.join(record.session_dir, contract.JSONL_SOCKET_NAME)
    assert os.path.dirname(contract.parse_unix_endpoint(record.endpoint)) == os.path.dirname(path)

    async def main() -> None:
        async with await JsonlSession.connect(path) as c:
            await c.initialize()
            assert await c.result("fake/echo", {"via": "jsonl"}) == {"params": {"via": "jsonl"}}

    asyncio.run(asyncio.wait_for(main(), 60))
    again = json.loads(world.cli("ensure", "--json").stdout)
    assert again["reused"] is True and again["jsonl_endpoint"] == record.jsonl_endpoint


def test_a_record_written_without_a_jsonl_endpoint_still_reads() -> None:
    data = {"endpoint": "unix:/tmp/x/s.sock", "pid": 123, "create_time": 1.0, "instance_id": "i", "started_at": 1.0,
            "session_dir": "/tmp/x", "log_file": "/tmp/l", "version": "v", "app_server_command": ["codex"],
            "codex_home": "/h", "cwd": "/w"}
    assert BrokerRecord.from_json(data).jsonl_endpoint == ""
    with pytest.raises(ValueError, match="jsonl_endpoint"):
        BrokerRecord.from_json({**data, "jsonl_endpoint": 5})
