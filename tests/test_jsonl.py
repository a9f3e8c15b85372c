"""The JSONL front end: framing, end of input, overflow, broker/shutdown and draining, Status,
and a companion-like client's whole life (connect-only check, initialize, thread and turn,
broker/shutdown, SIGTERM to the process group)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat

import pytest
from conftest import WAIT, aio_channel, is_turn_completed, run, short_dir, status, status_until
from jsonl_support import JsonlClient, connect_only, jsonl_flags, jsonl_path

from protos import broker_pb2


@pytest.fixture
def jb(broker):
    """Factory: a broker serving JSONL at ``<a fresh dir>/broker.sock`` too; returns (broker, path)."""
    dirs = []

    def start(*flags, **kw):
        directory = short_dir()
        dirs.append(directory)
        path = jsonl_path(directory)
        return broker(*jsonl_flags(path), *flags, **kw), path

    yield start
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def test_jsonl_session_initializes_from_the_cache_and_runs_a_turn(jb):
    b, path = jb()

    async def main():
        async with await JsonlClient.open(path) as c:
            reply = await c.initialize()
            assert "userAgent" in reply["result"]
            thread = await c.start_thread()
            turn = await c.start_turn(thread, "deltas=5")
            await c.turn_completed(thread, turn)
            assert not any(m.get("error") for m in c.messages)

    run(main())
