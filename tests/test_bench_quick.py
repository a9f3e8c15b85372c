"""`python -m bench --quick --report` runs end to end and produces every figure (no timing
assertions: speed is the benchmark's business, not the tests')."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import ROOT

FIGURES = [
    "unary.direct.p50_us", "unary.direct.p90_us", "unary.direct.p99_us",
    "unary.session.p50_us", "unary.session.p90_us", "unary.session.p99_us",
    "unary.call.p50_us", "unary.call.p90_us", "unary.call.p99_us",
    "stream.direct.notes_per_s", "stream.session.notes_per_s",
    "stream4.fanout_session.notes_per_s", "stream4.turns_direct.notes_per_s", "stream4.turns_session.notes_per_s",
    "concurrent.direct.rps", "concurrent.session.served", "concurrent.session.refused", "concurrent.session.rps",
    "startup.broker_to_serving_s", "startup.app_server_start_s", "startup.broker_excl_app_server_s",
    "ensure.in_process_p50_ms", "ensure.process_p50_ms",
    "health.sigstop_to_not_serving_s", "drain.last_turn_to_exit_s",
    "memory.idle_mb", "memory.sessions16_mb", "memory.slow_reader.rss_max_mb", "memory.slow_reader.rss_max_deltas_mb",
    "memory.slow_reader.slow_session_dropped",
    "unary.jsonl.p50_us", "unary.jsonl.p99_us", "stream.jsonl.notes_per_s", "concurrent.jsonl.served",
    "concurrent.jsonl.rps", "memory.sessions16_jsonl_mb", "memory.slow_reader_jsonl.rss_max_deltas_mb",
    "memory.slow_reader_jsonl.slow_session_dropped",
]


def lookup(results: dict, path: str):
    node = results
    for key in path.split("."):
        assert isinstance(node, dict) and key in node, f"{path}: no {key!r} in {node!r:.300}"
        node = node[key]
    return node


def test_quick_bench_produces_every_figure_and_the_report(tmp_path: Path):
    out, docs = tmp_path / "results", tmp_path / "docs"
    argv = [sys.executable, "-m", "bench", "--quick", "--report", "--out", str(out), "--docs", str(docs)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "latest.json").read_text())
    for path in FIGURES:
        value = lookup(results, path)
        assert isinstance(value, int | float), f"{path} = {value!r}"
    assert results["concurrent"]["session"]["attempted"] == results["concurrent"]["session"]["served"] \
        + results["concurrent"]["session"]["refused"] + sum(results["concurrent"]["session"]["other_errors"].values())
    assert {t["id"] for t in results["targets"]} >= {"unary_session_p50", "stream_one_client", "concurrent_rps",
                                                     "start", "health_sigstop", "drain_exit", "rss_slow_reader",
                                                     "jsonl_unary_p50", "jsonl_stream_vs_direct",
                                                     "jsonl_concurrent_served", "jsonl_concurrent_rps",
                                                     "jsonl_rss_sessions16", "jsonl_rss_slow_reader"}
    assert all(t["pass"] is not None for t in results["targets"]), [t for t in results["targets"] if t["pass"] is None]
    assert (docs / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (docs / "BENCHMARKS.md").read_text()
    assert "bench.png" in report and ("PASS" in report or "MISS" in report)
    assert "16 JSONL Sessions" in report and "JSONL: unary round trip, p50" in report
