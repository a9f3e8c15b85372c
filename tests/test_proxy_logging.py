"""Bounded logging: an app-server writing to stderr at full speed cannot grow the broker's log
past its cap; `serve --log-file` rotates by size, so a file never passes --log-max-bytes, and a
refusal still ends up as the log's last line."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
from harness import SERVING, run_serve, wait_for
from lifecycle_support import world_for

from proxy.appserver import STDERR_BURST, STDERR_RATE, RateLimit

MIB = 1 << 20


def flood(b, seconds: float, line_bytes: int = 200) -> int:
    """Has the app-server flood its stderr; the number of lines it wrote."""
    start = time.monotonic()
    reply = b.call("fake/stderrFlood", {"seconds": seconds, "lineBytes": line_bytes}, timeout=60)
    assert b.health() == SERVING
    assert time.monotonic() - start < seconds + 30
    return json.loads(reply.result_json)["lines"]


def test_rate_limit_grants_a_burst_then_the_rate_and_counts_the_rest():
    limit = RateLimit(rate=10.0, burst=5)
    assert limit.take(100.0, 8) == 5
    assert limit.take(100.0, 1) == 0
    assert limit.take(100.5, 10) == 5  # 0.5 s at 10/s
    assert limit.take(200.0, 100) == 5  # refilled to the burst, not beyond
    assert limit.take_dropped() == 3 + 1 + 5 + 95
    assert limit.take_dropped() == 0


def test_an_app_server_flooding_stderr_is_rate_limited_and_the_drops_summarized(broker):
    b = broker()
    lines = flood(b, 3.0)
    assert lines > 10_000, lines  # what the limit is up against
    wait_for(lambda: "stderr lines not logged" in b.log(), what="the summary of the dropped lines")
    logged = b.log().count(" INFO app-server: flood ")
    elapsed_bound = 3.0 + 30  # the flood's length plus the call's own slack
    assert logged <= STDERR_BURST + STDERR_RATE * elapsed_bound, logged
    assert b.log_path.stat().st_size < 2 * MIB, b.log_path.stat().st_size
    b.drain()
    assert b.wait_exit(30) == 0


def test_serve_log_file_never_passes_its_cap_and_keeps_one_previous_file(broker, tmp_path: Path):
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "broker-x.log"
    cap = 64 << 10
    b = broker("--log-file", str(path), "--log-max-bytes", str(cap))
    flood(b, 4.0, line_bytes=3000)  # ~50 lines/s of 3 KB reach the log: it rotates
    b.drain()
    assert b.wait_exit(30) == 0
    files = sorted(os.listdir(logs))
    assert files == ["broker-x.1.log", "broker-x.log"], files
    for name in files:
        assert (logs / name).stat().st_size <= cap, (name, (logs / name).stat().st_size)
    assert "stopped exit_code=0" in path.read_text()
    assert b.log() == "", "nothing went to the original stderr"


def test_serve_with_a_log_file_writes_its_refusal_as_the_last_line_there(tmp_path: Path):
    path = tmp_path / "broker.log"
    result = run_serve("--endpoint", "nope:1", "--app-server", "true", "--log-file", str(path))
    assert result.returncode == 2
    assert result.stderr == ""
    last = path.read_text().splitlines()[-1]
    assert last.startswith("codex-broker serve: unsupported endpoint"), last


def test_a_spawned_broker_writes_its_own_size_capped_log(tmp_path: Path):
    with world_for(tmp_path) as world:
        session = world.ensure()
        argv = psutil.Process(session.pid).cmdline()
        assert argv[argv.index("--log-file") + 1] == session.log_file
        assert f"ready endpoint={session.endpoint}" in Path(session.log_file).read_text()

