"""docs/bench.png: unary latency distributions (direct, Session, Call), notification and
request throughputs next to the Node reference, and the broker's RSS behind a slow reader."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import NODE_CONCURRENT_OK_RPS, NODE_NOTES_PER_S, NODE_UNARY_P50_US, RSS_LIMIT_MB, get

COLORS = {"direct": "#4c72b0", "session": "#dd8452", "call": "#55a868", "node": "#bbbbbb"}


def render(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _latency(axes[0][0], results)
    _streams(axes[0][1], results)
    _concurrent(axes[1][0], results)
    _slow_reader(axes[1][1], results)
    meta = results.get("meta", {})
    fig.suptitle(f"codex-broker benchmark ({meta.get('mode', '?')} run) - {meta.get('cpu', '?')}, "
                 f"{meta.get('cores', '?')} cores, Python {meta.get('python', '?')}, grpcio {meta.get('grpcio', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _latency(ax: Any, results: dict[str, Any]) -> None:
    for peer, label in (("direct", "direct stdio"), ("session", "broker Session"), ("call", "broker Call")):
        samples = get(results, f"unary.{peer}.samples_us")
        if not samples:
            continue
        xs = sorted(samples)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{label} (p50 {get(results, f'unary.{peer}.p50_us'):.0f} us)", color=COLORS[peer])
    ax.axvline(NODE_UNARY_P50_US, color="grey", linestyle=":", label=f"Node broker p50 ({NODE_UNARY_P50_US:.0f} us)")
    ax.axvline(1.5 * NODE_UNARY_P50_US, color="red", linestyle="--", label="target: Session p50 <= 1.5 x Node")
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Unary {get(results, 'unary.direct.method') or ''} round trip, CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _bars(ax: Any, bars: list[tuple[str, Any, str]], unit: str) -> None:
    shown = [(label, value, color) for label, value, color in bars if isinstance(value, int | float)]
    xs = range(len(shown))
    rects = ax.bar(xs, [v for _, v, _ in shown], color=[c for _, _, c in shown])
    for rect, (_, value, _) in zip(rects, shown, strict=True):
        ax.annotate(f"{value / 1e3:,.0f}k", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [label for label, _, _ in shown], fontsize=8)
    ax.set_ylabel(unit)
    ax.grid(True, axis="y", alpha=0.3)


def _streams(ax: Any, results: dict[str, Any]) -> None:
    _bars(ax, [
        ("1 client\ndirect", get(results, "stream.direct.notes_per_s"), COLORS["direct"]),
        ("1 client\nSession", get(results, "stream.session.notes_per_s"), COLORS["session"]),
        ("1 client\nNode (ref.)", NODE_NOTES_PER_S, COLORS["node"]),
        ("4 Sessions,\n1 thread (fan-out)", get(results, "stream4.fanout_session.notes_per_s"), COLORS["session"]),
        ("4 turns\ndirect", get(results, "stream4.turns_direct.notes_per_s"), COLORS["direct"]),
        ("4 turns,\n4 Sessions", get(results, "stream4.turns_session.notes_per_s"), COLORS["session"]),
    ], "notifications delivered / s")
    ax.axhline(1.5 * NODE_NOTES_PER_S, color="red", linestyle="--", label="target: 1.5 x Node (1 client)")
    direct = get(results, "stream.direct.notes_per_s")
    if direct:
        ax.axhline(0.75 * direct, color="purple", linestyle=":", label="target: 75 % of direct (1 client)")
    ax.set_title(f"Notification throughput ({get(results, 'stream.direct.deltas_per_turn') or '?':,} deltas per turn)")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=2)


def _concurrent(ax: Any, results: dict[str, Any]) -> None:
    clients = get(results, "concurrent.session.clients") or 16
    _bars(ax, [
        ("direct\n(one shared pipe)", get(results, "concurrent.direct.rps"), COLORS["direct"]),
        (f"{clients} Sessions", get(results, "concurrent.session.rps"), COLORS["session"]),
        ("Node (ref.)", NODE_CONCURRENT_OK_RPS, COLORS["node"]),
        ("unary Session\n(1 client)", get(results, "unary.session.rps"), COLORS["session"]),
        ("unary Call\n(1 client)", get(results, "unary.call.rps"), COLORS["call"]),
    ], "requests served / s (log scale)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=100)
    ax.axhline(3 * NODE_CONCURRENT_OK_RPS, color="red", linestyle="--", label="target: 3 x Node")
    ax.set_title(f"Request throughput ({clients} clients x {get(results, 'concurrent.session.per_client') or '?'} "
                 "requests at once; 1 client sequential)")
    ax.legend(fontsize=8)


def _slow_reader(ax: Any, results: dict[str, Any]) -> None:
    slow = get(results, "memory.slow_reader") or {}
    series = slow.get("series_mb") or []
    if series:
        ax.plot([t for t, _ in series], [m for _, m in series], color=COLORS["session"], label="broker RSS")
    ax.axhline(RSS_LIMIT_MB, color="red", linestyle="--", label=f"target: < {RSS_LIMIT_MB:.0f} MB")
    for key, label, color in (("idle_mb", "idle", "grey"), ("sessions16_mb", "16 Sessions", COLORS["call"])):
        value = get(results, f"memory.{key}")
        if value:
            ax.axhline(value, color=color, linestyle=":", label=f"{label}: {value:.0f} MB")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since turn/start")
    ax.set_ylabel("broker RSS (MB)")
    deltas = slow.get("deltas")
    ax.set_title(f"Broker memory behind a slow reader ({deltas:,} deltas)" if deltas else "Broker memory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
