"""deploy/systemd/codex-broker@.service: systemd's own `systemd-analyze verify` accepts it (as a
user unit, with its ExecStart found under the home directory), and its settings fit the broker:
Type=notify, KillMode=mixed, a stop timeout covering the drain deadline and the stop escalation,
a watchdog, the idle timeout off, a restart after exit 0 or 1 but not 2, a short socket path, and
flags that `serve` accepts."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT

from proxy import contract
from proxy.contract import STOP_ESCALATION

UNIT = Path(ROOT) / "deploy" / "systemd" / "codex-broker@.service"
SOCKET_PATH_MAX = 107  # sun_path's 108 bytes, NUL included
LONGEST_RUNTIME_DIR = "/run/user/4294967294"  # %t of the largest uid
INSTANCE = "home-someone-src-project"


def read_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (in order), continuation lines joined, comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return read_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def serve_args(service: dict[str, list[str]], runtime_dir: str = LONGEST_RUNTIME_DIR) -> argparse.Namespace:
    argv = shlex.split(one(service, "ExecStart"))
    assert argv[0] == "%h/.local/bin/codex-broker" and argv[1] == "serve", argv
    expanded = [a.replace("%t", runtime_dir).replace("%i", INSTANCE).replace("%I", INSTANCE.replace("-", "/"))
                .replace("%n", f"codex-broker@{INSTANCE}.service") for a in argv[2:]]
    parser = argparse.ArgumentParser()
    contract.add_serve_arguments(parser)
    return parser.parse_args(expanded)


def seconds(value: str) -> float:
    """A systemd time span in the forms the unit uses: N, Ns, Nmin."""
    for suffix, factor in (("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def test_systemd_analyze_verify_accepts_the_user_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: .ci/run installs Debian's systemd package"
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "codex-broker").symlink_to(Path(sys.executable).parent / "codex-broker")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(UNIT, units / UNIT.name)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run([analyze, "verify", "--user", str(units / f"codex-broker@{INSTANCE}.service")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # warnings (an unknown or bad setting) too


def test_the_unit_is_type_notify_with_a_watchdog_and_kills_only_the_broker_with_sigterm(service):
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "KillMode") == "mixed"
    assert seconds(one(service, "WatchdogSec")) > 0


def test_the_stop_timeout_covers_the_drain_deadline_and_the_stop_escalation(service):
    args = serve_args(service)
    assert seconds(one(service, "TimeoutStopSec")) >= args.drain_deadline + STOP_ESCALATION


def test_the_unit_restarts_after_max_age_and_wedge_exits_but_not_after_bad_input(service):
    assert one(service, "Restart") == "always"  # exit 0 (a drain on max age) and exit 1 (a wedge)
    assert one(service, "RestartPreventExitStatus") == "2"


def test_the_unit_serves_a_fixed_short_socket_path_with_the_idle_timeout_off(service):
    args = serve_args(service)
    assert args.idle_timeout == 0
    path = contract.parse_unix_endpoint(args.endpoint)
    assert path.startswith(LONGEST_RUNTIME_DIR + "/")
    room = SOCKET_PATH_MAX - (len(path) - len(INSTANCE))
    assert room >= 64, f"only {room} bytes left for the instance name"
    assert args.cwd == "/" + INSTANCE.replace("-", "/")
