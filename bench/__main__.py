"""``python -m bench``: run the benchmark once, write bench/results/latest.json.

    python -m bench                 # full run (about a minute or two)
    python -m bench --quick         # smaller counts, under 30 s
    python -m bench --report        # also regenerate docs/BENCHMARKS.md and docs/bench.png
    python -m bench --report --from bench/results/latest.json   # only regenerate the docs
    python -m bench --only unary,stream                          # a subset of the steps

Run it from the repository root with the project's virtualenv python (.venv/bin/python)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # grpc core's INFO lines (a GOAWAY at each broker stop) are noise here

from bench import report  # noqa: E402
from bench.procs import PROFILE_ENV, ROOT  # noqa: E402
from bench.runner import QUICK, STEPS, Counts, Run, progress  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 epilog=f"Profiling: {PROFILE_ENV}=cprofile:DIR or pyspy:DIR runs every broker of the "
                                        "run under that profiler, one output file per broker in DIR.")
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run, under 30 s)")
    ap.add_argument("--report", action="store_true", help="write BENCHMARKS.md and bench.png into --docs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where latest.json goes")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where --report writes (default docs/)")
    ap.add_argument("--from", dest="source", type=Path, help="with --report: use this results file, run nothing")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps (default all): {','.join(STEPS)}")
    args = ap.parse_args(argv)
    args.steps = tuple(s for s in args.only.split(",") if s)
    if unknown := set(args.steps) - set(STEPS):
        ap.error(f"unknown steps: {', '.join(sorted(unknown))}")
    if args.source and not args.report:
        ap.error("--from only makes sense with --report")
    return args


async def run(counts: Counts, steps: tuple[str, ...], quick: bool) -> tuple[dict[str, Any], list[str]]:
    started, load = time.time(), os.getloadavg()[0]
    t0 = time.perf_counter()
    plan = Run(counts, steps)
    results = await plan.run()
    results["meta"] = {**report.machine(), "mode": "quick" if quick else "full", "started_at": started,
                       "duration_s": time.perf_counter() - t0,
                       "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0]}
    results["targets"] = report.evaluate(results)
    return results, plan.failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed: list[str] = []
    if args.source:
        results = json.loads(args.source.read_text())
        results["targets"] = report.evaluate(results)  # the targets as this version judges them
    else:
        counts = QUICK if args.quick else Counts()
        progress(f"{'quick' if args.quick else 'full'} run: steps {', '.join(args.steps)}")
        results, failed = asyncio.run(run(counts, args.steps, args.quick))
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / "latest.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
        progress(f"wrote {out} ({results['meta']['duration_s']:.1f} s)")
    print(report.targets_table(results["targets"]))
    if args.report:
        md, png = report.write_docs(results, args.docs)
        progress(f"wrote {md} and {png}")
    if failed:
        progress(f"steps that failed: {', '.join(sorted(set(failed)))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
