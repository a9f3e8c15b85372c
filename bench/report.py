"""Targets from DESIGN.md section 7, their evaluation, and docs/BENCHMARKS.md.

The Node broker's figures are the reference ones DESIGN.md gives (measured on a 2-core machine
of this project's kind with the same fake and the same Python client); they are not re-measured
here. Everything else comes from the run's results file."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

NODE_UNARY_P50_US = 241.0
NODE_NOTES_PER_S = 116_000.0
NODE_START_S = 0.21
NODE_REFUSED_SHARE = 0.84
# DESIGN.md gives no successful rate for the Node broker under 16 clients x 200 requests, only
# that 84 % were refused as busy. This one was measured with the independent peer-bench harness
# on a machine of this kind (2 cores; openai/codex-plugin-cc at 80c31f9, node v20.20.2, same fake,
# same Python client) on 2026-11-24: 496 of 3,200 served in 0.132 s, median of 5 runs (two more
# runs that day: 3,591/s and 4,222/s). An earlier measurement gave 1,940/s (485 served in 0.25 s):
# Node's refusals are quick, so its rate moves with how fast it refuses. The higher, fresher
# figure is the one held to the target.
NODE_CONCURRENT_OK_RPS = 3_807.0
RSS_LIMIT_MB = 60.0
JSONL_STREAM_SHARE = 0.85  # the JSONL front end's targets: issue 10, item 8


def get(results: dict[str, Any], path: str) -> Any:
    node: Any = results
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ratio(results: dict[str, Any], num: str, den: str) -> float | None:
    a, b = get(results, num), get(results, den)
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def paired_ratio(results: dict[str, Any], num: str, den: str) -> float | None:
    """The median of the ratios of repetitions run side by side (direct, then broker, ...): the
    machine's speed drifts during a run, and each pair saw about the same machine. Without
    repetitions, the ratio of the two figures."""
    a, b = get(results, f"{num}_reps"), get(results, f"{den}_reps")
    if isinstance(a, list) and isinstance(b, list) and a and len(a) == len(b) and all(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return _ratio(results, num, den)


@dataclass(frozen=True)
class Target:
    id: str
    figure: str
    value: Callable[[dict[str, Any]], Any]
    op: str  # <=, <, >=, ==
    limit: Callable[[dict[str, Any]], Any]
    unit: str
    wording: str  # the target as DESIGN.md states it

    def evaluate(self, results: dict[str, Any]) -> dict[str, Any]:
        value, limit = self.value(results), self.limit(results)
        ok = None
        if value is not None and limit is not None:
            ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit, "==": value == limit}[self.op]
        return {"id": self.id, "figure": self.figure, "value": value, "op": self.op, "limit": limit,
                "unit": self.unit, "target": self.wording, "pass": ok}


def _const(x: float) -> Callable[[dict[str, Any]], float]:
    return lambda r: x


def _at(path: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: get(r, path)


TARGETS = [
    Target("unary_session_p50", "Unary round trip over a Session, p50", _at("unary.session.p50_us"), "<=",
           _const(1.5 * NODE_UNARY_P50_US), "us", f"<= 1.5 x Node's {NODE_UNARY_P50_US:.0f} us"),
    Target("stream_one_client", "Notifications to one client (one turn)", _at("stream.session.notes_per_s"), ">=",
           _const(1.5 * NODE_NOTES_PER_S), "/s", f">= 1.5 x Node's {NODE_NOTES_PER_S / 1e3:.0f}k/s"),
    Target("stream_vs_direct", "Notifications to one client, share of direct",
           lambda r: paired_ratio(r, "stream.session.notes_per_s", "stream.direct.notes_per_s"), ">=", _const(0.75),
           "x", ">= 75 % of direct (median of the paired repetitions' ratios)"),
    Target("concurrent_served", "16 concurrent Sessions: requests served", _at("concurrent.session.served"), "==",
           _at("concurrent.session.attempted"), "", "every request served"),
    Target("concurrent_refused", "16 concurrent Sessions: requests refused", _at("concurrent.session.refused"), "==",
           _const(0), "", "none refused"),
    Target("concurrent_rps", "16 concurrent Sessions: aggregate rate", _at("concurrent.session.rps"), ">=",
           _const(3 * NODE_CONCURRENT_OK_RPS), "/s",
           f">= 3 x Node's successful rate ({NODE_CONCURRENT_OK_RPS:,.0f}/s, see notes)"),
    Target("start", "Broker start to SERVING, its app-server's start included",
           _at("startup.broker_to_serving_s"), "<=", _const(NODE_START_S), "s",
           f"no slower than Node's {NODE_START_S:.2f} s"),
    Target("ensure_in_process", "ensure_broker reuse path, in process, p50", _at("ensure.in_process_p50_ms"), "<",
           _const(5.0), "ms", "< 5 ms"),
    Target("ensure_process", "codex-broker ensure, whole process (reuse), p50", _at("ensure.process_p50_ms"), "<",
           _const(300.0), "ms", "< 300 ms"),
    Target("health_sigstop", "SIGSTOPped app-server -> Health Watch NOT_SERVING",
           _at("health.sigstop_to_not_serving_s"), "<=", _const(5.0), "s", "within 5 s"),
    Target("drain_exit", "Drained broker gone after its last turn completed", _at("drain.last_turn_to_exit_s"), "<=",
           _const(1.0), "s", "within 1 s"),
    Target("rss_sessions16", "Broker RSS with 16 open Sessions", _at("memory.sessions16_mb"), "<",
           _const(RSS_LIMIT_MB), "MB", f"< {RSS_LIMIT_MB:.0f} MB"),
    Target("rss_slow_reader", "Broker RSS behind a slow reader, while the deltas stream (max)",
           _at("memory.slow_reader.rss_max_deltas_mb"), "<", _const(RSS_LIMIT_MB), "MB",
           f"bounded, < {RSS_LIMIT_MB:.0f} MB"),
    Target("rss_slow_reader_turn", "Broker RSS max over that whole turn, its final item/completed included",
           _at("memory.slow_reader.rss_max_mb"), "<", _const(RSS_LIMIT_MB), "MB",
           f"bounded, < {RSS_LIMIT_MB:.0f} MB"),
    Target("jsonl_unary_p50", "JSONL: unary round trip, p50", _at("unary.jsonl.p50_us"), "<=",
           _const(NODE_UNARY_P50_US), "us", f"no worse than Node's {NODE_UNARY_P50_US:.0f} us"),
    Target("jsonl_stream_vs_direct", "JSONL: notifications to one client, share of direct",
           lambda r: paired_ratio(r, "stream.jsonl.notes_per_s", "stream.direct.notes_per_s"), ">=",
           _const(JSONL_STREAM_SHARE), "x",
           f">= {JSONL_STREAM_SHARE * 100:.0f} % of direct (median of the paired repetitions' ratios)"),
    Target("jsonl_concurrent_served", "JSONL: 16 concurrent Sessions, requests served", _at("concurrent.jsonl.served"),
           "==", _at("concurrent.jsonl.attempted"), "", "every request served"),
    Target("jsonl_concurrent_rps", "JSONL: 16 concurrent Sessions, aggregate rate", _at("concurrent.jsonl.rps"), ">=",
           _const(3 * NODE_CONCURRENT_OK_RPS), "/s",
           f">= 3 x Node's successful rate ({NODE_CONCURRENT_OK_RPS:,.0f}/s, see notes)"),
    Target("jsonl_rss_sessions16", "JSONL: broker RSS with 16 JSONL Sessions (after their requests)",
           _at("memory.sessions16_jsonl_mb"), "<", _const(RSS_LIMIT_MB), "MB", f"< {RSS_LIMIT_MB:.0f} MB"),
    Target("jsonl_rss_slow_reader", "JSONL: broker RSS behind a slow JSONL reader, while the deltas stream (max)",
           _at("memory.slow_reader_jsonl.rss_max_deltas_mb"), "<", _const(RSS_LIMIT_MB), "MB",
           f"bounded, < {RSS_LIMIT_MB:.0f} MB"),
]


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [t.evaluate(results) for t in TARGETS]


def fmt(value: Any, unit: str) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if unit == "x":
        return f"{value * 100:.0f} %"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "us":
        return f"{value:.0f} us"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"
    if unit == "s":
        return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:,}" if isinstance(value, int) else f"{value:.2f}"


def verdict(t: dict[str, Any]) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [(t["figure"], fmt(t["value"], t["unit"]), t["target"], verdict(t)) for t in targets]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "grpcio": _version("grpcio"), "protobuf": _version("protobuf"),
            "orjson": _version("orjson"), "codex_broker": _version("codex-broker")}


def write_docs(results: dict[str, Any], docs: Path) -> tuple[Path, Path]:
    from bench import markdown, plot

    docs.mkdir(parents=True, exist_ok=True)
    png = docs / "bench.png"
    plot.render(results, png)
    md = docs / "BENCHMARKS.md"
    md.write_text(markdown.render(results, png.name, time.strftime("%Y-%m-%d", time.gmtime(
        results.get("meta", {}).get("started_at", time.time())))))
    return md, png
