"""A start loads only what serving needs: the modules behind a flag (metrics, the JSONL front end,
the token guard, the rotated log file) load only when the flag is given, `codex-broker serve`
loads none of the other subcommands' modules, and the garbage collector, off during the start,
is on again (with the start's objects frozen) once the broker has served.

The modules a broker loaded are read from ``python -X importtime``'s report (one line per
module, on stderr, as each import completes), taken once the broker is SERVING."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from harness import ROOT, fake_command, new_marker, short_dir, wait_serving
from proc_support import processes_with, wait_gone

IMPORTTIME = [sys.executable, "-X", "importtime"]
CLI_SCRIPT = Path(sys.executable).with_name("codex-broker")
# Loaded only when a flag asks for them; none of these flags is given by default.
FLAG_MODULES = {"prometheus_client", "proxy.metrics", "proxy.jsonl", "proxy.auth", "proxy.logfile",
                "logging.handlers"}
# Loaded by every start: proof that the report was read.
SERVING_MODULES = {"grpc", "proxy.broker", "proxy.hub", "proxy.health"}
# `serve` in a process that says, once serve has returned, whether the collector is on and how
# many objects were frozen.
GC_REPORT = ("import gc, sys\n"
             "from proxy.cli import main\n"
             "code = main(sys.argv[1:])\n"
             "print('gc', gc.isenabled(), gc.get_freeze_count(), flush=True)\n"
             "sys.exit(code)\n")


def imported(report: str) -> set[str]:
    """The module names in ``-X importtime`` lines."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", report, re.MULTILINE))


def serve_once(command: Sequence[str], *flags: str) -> tuple[set[str], str]:
    """Runs ``command serve --endpoint ... FLAGS`` in front of the fake app-server until it is
    SERVING, then stops it (SIGTERM: exit 0, nothing left behind). The modules its stderr's
    importtime report named by then, and its stdout."""
    base = short_dir()
    marker = new_marker()
    endpoint = f"unix:{base}/d/s.sock"
    err, out = Path(base) / "stderr", Path(base) / "stdout"
    argv = [*command, "serve", "--endpoint", endpoint, "--app-server", fake_command(marker=marker),
            *(f.replace("{base}", base) for f in flags)]
    try:
        with open(err, "wb") as err_file, open(out, "wb") as out_file:
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file)
        try:
            wait_serving(endpoint, proc, 60.0, lambda: err.read_text(errors="replace")[-4000:])
            modules = imported(err.read_text(errors="replace"))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, err.read_text(errors="replace")[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert wait_gone(processes_with(marker), 10.0) == []
        return modules, out.read_text()
    finally:
        shutil.rmtree(base)


def test_a_broker_without_flags_serves_without_the_modules_its_flags_would_load():
    modules, _ = serve_once([*IMPORTTIME, "-m", "proxy"])
    assert SERVING_MODULES <= modules
    assert sorted(FLAG_MODULES & modules) == []
    assert sorted(m for m in modules if m.split(".")[0] == "lifecycle") == []


def test_the_metrics_and_jsonl_flags_load_their_modules_by_the_time_the_broker_serves():
    modules, _ = serve_once([*IMPORTTIME, "-m", "proxy"], "--metrics-endpoint", "tcp:127.0.0.1:0",
                            "--jsonl-endpoint", "unix:{base}/j.sock")
    assert {"prometheus_client", "proxy.metrics", "proxy.jsonl"} <= modules
    assert sorted({"proxy.auth", "proxy.logfile"} & modules) == []


def test_codex_broker_serve_loads_no_module_of_the_other_subcommands():
    modules, _ = serve_once([*IMPORTTIME, str(CLI_SCRIPT)])
    assert {"lifecycle.cli"} | SERVING_MODULES <= modules
    assert sorted(m for m in modules if m.startswith("lifecycle.") and m != "lifecycle.cli") == []
    assert sorted(FLAG_MODULES & modules) == []


def test_the_collector_is_on_again_with_the_start_frozen_after_a_broker_has_served():
    _, out = serve_once([sys.executable, "-c", GC_REPORT])
    word, enabled, frozen = out.split()
    assert (word, enabled) == ("gc", "True")
    assert int(frozen) > 10_000  # modules, classes, descriptors: what the start created
