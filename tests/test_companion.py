"""``codex-broker companion install|uninstall|status`` on a fake Claude Code config dir and plugin
tree, and the Node launcher it installs, run for real by node with a stand-in codex-broker
(tests/companion_stand_in.py) and a stand-in original broker (tests/companion_fake_original.mjs),
started the way the companion starts its broker: detached, in a fresh 0700 directory, output
appended to broker.log there.

The fake original is not the upstream file: its sha256 is made known through
CODEX_BROKER_COMPANION_EXTRA_SHA256, the variable that exists for this."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from proc_support import processes_with, wait_for

from lifecycle import companion

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).with_name("codex-broker"))]
FAKE_ORIGINAL = ROOT / "tests" / "companion_fake_original.mjs"
STAND_IN = ROOT / "tests" / "companion_stand_in.py"
UPSTREAM_SHA256 = "08c88af645a853c862c761d594267c227f62e543153d36d0d6a6912f9a843721"
WAIT = 30.0


@dataclass
class Claude:
    """A fake Claude Code config dir with the companion installed at one version."""

    tmp: Path
    env: dict[str, str]
    config: Path

    def plugin_root(self, version: str) -> Path:
        return self.config / "plugins" / "cache" / "openai-codex" / "codex" / version

    def add_version(self, version: str, broker: bytes | None = None) -> Path:
        """A plugin root holding a broker file (the fake original by default), recorded as the
        installed version in installed_plugins.json (as a plugin update does)."""
        root = self.plugin_root(version)
        (root / "scripts").mkdir(parents=True)
        (root / "scripts" / "app-server-broker.mjs").write_bytes(FAKE_ORIGINAL.read_bytes() if broker is None
                                                                 else broker)
        records = self.config / "plugins" / "installed_plugins.json"
        records.write_text(json.dumps({"version": 2, "plugins": {"codex@openai-codex": [
            {"scope": "user", "installPath": str(root), "version": version}]}}))
        return root

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "companion", *args], env=env or self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)

    def json(self, *args: str) -> tuple[int, dict[str, object]]:
        done = self.cli(*args, "--json")
        return done.returncode, json.loads(done.stdout)


def stand_in_broker(directory: Path) -> Path:
    """An executable codex-broker stand-in (its behaviour comes from STAND_IN_* variables)."""
    path = directory / "codex-broker"
    # mode "exit" is answered by the shell: a Python start on a loaded machine must not eat the budget
    path.write_text("#!/bin/sh\n"
                    'if [ "$STAND_IN_MODE" = exit ]; then echo \'{"event": "start"}\' >> "$STAND_IN_LOG"; exit 3; fi\n'
                    f'exec {sys.executable} {STAND_IN} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def claude(tmp_path: Path) -> Claude:
    config = tmp_path / "claude"
    (config / "plugins").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEX_BROKER_", "CLAUDE_", "STAND_IN_"))}
    env.update(HOME=str(tmp_path / "home"), CLAUDE_CONFIG_DIR=str(config),
               CODEX_BROKER_STATE_DIR=str(tmp_path / "state"),
               CODEX_BROKER_COMPANION_EXTRA_SHA256=companion.sha256(FAKE_ORIGINAL.read_bytes()))
    return Claude(tmp_path, env, config)


def broker_file(root: Path) -> Path:
    return root / "scripts" / "app-server-broker.mjs"


# -- install, uninstall, status ------------------------------------------------------------------
def test_the_upstream_broker_hash_is_known() -> None:
    assert UPSTREAM_SHA256 in companion.KNOWN_SHA256
    assert UPSTREAM_SHA256 in companion.known_hashes({})


def test_install_replaces_the_known_broker_with_the_launcher_keeping_the_original_beside_and_backed_up(
        claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    original = broker_file(root).read_bytes()
    code, out = claude.json("install", "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert code == 0 and out["ok"] is True
    [copy] = out["copies"]  # type: ignore[misc]
    assert copy["plugin_root"] == str(root) and copy["action"] == "patch" and copy["state"] == "patched"
    launcher = broker_file(root).read_bytes()
    config = companion.parse_launcher(launcher)
    assert config is not None and config.codex_broker == str(claude.tmp / "codex-broker")
    assert (root / "scripts" / companion.ORIGINAL_NAME).read_bytes() == original
    backups = list((claude.tmp / "state" / "companion").glob("*/original.mjs"))
    assert [b.read_bytes() for b in backups] == [original]
    assert stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    for directory in (backups[0].parent, backups[0].parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert not list(root.rglob(".*.tmp"))


def test_install_is_idempotent_and_uninstall_restores_the_original_byte_for_byte(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    original = broker_file(root).read_bytes()
    broker = str(stand_in_broker(claude.tmp))
    assert claude.cli("install", "--codex-broker", broker).returncode == 0
    launcher = broker_file(root).read_bytes()
    code, out = claude.json("install", "--codex-broker", broker)
    assert code == 0 and out["copies"][0]["action"] == "nothing"  # type: ignore[index]
    assert broker_file(root).read_bytes() == launcher

    code, out = claude.json("uninstall")
    assert code == 0 and out["copies"][0]["action"] == "restore"  # type: ignore[index]
    assert broker_file(root).read_bytes() == original
    assert sorted(p.name for p in (root / "scripts").iterdir()) == ["app-server-broker.mjs"]
    assert not list((claude.tmp / "state" / "companion").iterdir())
    code, out = claude.json("uninstall", "--plugin-dir", str(root))
    assert code == 0 and out["copies"][0]["action"] == "nothing"  # type: ignore[index]


def test_install_again_with_another_codex_broker_rewrites_the_launcher(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    assert claude.cli("install", "--codex-broker", str(stand_in_broker(claude.tmp))).returncode == 0
    other = claude.tmp / "other"
    other.mkdir()
    code, out = claude.json("install", "--codex-broker", str(stand_in_broker(other)))
    assert code == 0 and out["copies"][0]["action"] == "update"  # type: ignore[index]
    config = companion.parse_launcher(broker_file(root).read_bytes())
    assert config is not None and config.codex_broker == str(other / "codex-broker")


def test_install_refuses_an_unknown_broker_file_unless_forced(claude: Claude) -> None:
    root = claude.add_version("1.0.5", broker=b"// someone's own broker\n")
    code, out = claude.json("install", "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert code == 1 and out["ok"] is False
    [copy] = out["copies"]  # type: ignore[misc]
    assert copy["action"] == "refuse" and "unknown" in copy["message"] and "--force" in copy["message"]
    assert broker_file(root).read_bytes() == b"// someone's own broker\n"
    assert not (root / "scripts" / companion.ORIGINAL_NAME).exists()

    done = claude.cli("install", "--force", "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert done.returncode == 0, done
    assert companion.parse_launcher(broker_file(root).read_bytes()) is not None
    assert claude.cli("uninstall").returncode == 0
    assert broker_file(root).read_bytes() == b"// someone's own broker\n"


def test_install_refuses_a_symlinked_broker_file_even_when_forced(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    real = claude.tmp / "elsewhere.mjs"
    broker_file(root).rename(real)
    broker_file(root).symlink_to(real)
    code, out = claude.json("install", "--force", "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert code == 1 and "symlink" in out["copies"][0]["message"]  # type: ignore[index]
    assert broker_file(root).is_symlink() and real.read_bytes() == FAKE_ORIGINAL.read_bytes()


def test_a_broker_file_of_another_user_is_never_read_or_patched(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    observed = companion.observe(broker_file(root), companion.known_hashes(claude.env), None,
                                 uid=os.getuid() + 1)
    assert observed.kind is companion.Kind.FOREIGN and observed.data is None
    decision = companion.decide_install(observed, b"launcher", force=True, in_marketplace=False)
    assert decision.action is companion.Action.REFUSE and "not owned by you" in decision.reason


def test_install_never_touches_the_marketplace_clone(claude: Claude) -> None:
    clone = claude.config / "plugins" / "marketplaces" / "openai-codex" / "plugins" / "codex"
    (clone / "scripts").mkdir(parents=True)
    broker_file(clone).write_bytes(FAKE_ORIGINAL.read_bytes())
    code, out = claude.json("install", "--plugin-dir", str(clone), "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert code == 1 and "marketplace" in out["copies"][0]["message"]  # type: ignore[index]
    assert broker_file(clone).read_bytes() == FAKE_ORIGINAL.read_bytes()


def test_finding_no_installed_copy_is_an_error(claude: Claude) -> None:
    done = claude.cli("install", "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert done.returncode == 1 and "no installed copy" in done.stderr
    (claude.config / "plugins" / "installed_plugins.json").write_text('{"version": 2, "plugins": {}}')
    for action in ("install", "uninstall", "status"):
        done = claude.cli(action)
        assert done.returncode == 1 and "no installed copy" in done.stderr, (action, done)


def test_claude_config_dir_is_claude_config_dir_else_dot_claude_in_home() -> None:
    assert companion.claude_config_dir({"CLAUDE_CONFIG_DIR": "/x/y", "HOME": "/h"}) == Path("/x/y")
    assert companion.claude_config_dir({"HOME": "/h"}) == Path("/h/.claude")


def test_status_reports_a_plugin_update_as_an_unpatched_new_version(claude: Claude) -> None:
    old = claude.add_version("1.0.5")
    assert claude.cli("install", "--codex-broker", str(stand_in_broker(claude.tmp))).returncode == 0
    new = claude.add_version("1.0.6")  # Claude Code now records only the new version directory
    code, out = claude.json("status")
    assert code == 0
    states = {c["plugin_root"]: (c["state"], c["version"]) for c in out["copies"]}  # type: ignore[attr-defined]
    assert states == {str(new): ("original", "1.0.6"), str(old): ("patched", None)}
    text = claude.cli("status").stdout
    assert f"{new} (1.0.6): not patched" in text and f"{old}: patched" in text

    code, out = claude.json("install", "--codex-broker", str(stand_in_broker(claude.tmp)))
    assert code == 0 and [c["plugin_root"] for c in out["copies"]] == [str(new)]  # type: ignore[attr-defined]
    code, out = claude.json("uninstall")  # both: the one Claude Code lists and the one install recorded
    assert code == 0 and {c["plugin_root"] for c in out["copies"]} == {str(new), str(old)}  # type: ignore[attr-defined]
    assert broker_file(old).read_bytes() == broker_file(new).read_bytes() == FAKE_ORIGINAL.read_bytes()


def test_status_says_whether_the_codex_broker_is_runnable(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    broker = stand_in_broker(claude.tmp)
    assert claude.cli("install", "--codex-broker", str(broker)).returncode == 0
    code, out = claude.json("status")
    [copy] = out["copies"]  # type: ignore[misc]
    assert code == 0 and copy["runnable"] is True and copy["codex_broker"] == str(broker)
    (root / "scripts" / companion.ORIGINAL_NAME).unlink()
    assert "is missing, so nothing to fall back to" in claude.cli("status").stdout
    assert claude.cli("install", "--codex-broker", str(broker)).returncode == 0  # puts it back
    assert (root / "scripts" / companion.ORIGINAL_NAME).read_bytes() == FAKE_ORIGINAL.read_bytes()
    broker.unlink()
    code, out = claude.json("status")
    [copy] = out["copies"]  # type: ignore[misc]
    assert code == 0 and copy["runnable"] is False and copy["state"] == "patched"
    assert f"{root}" in claude.cli("status").stdout and "NOT runnable" in claude.cli("status").stdout


def test_uninstall_refuses_when_the_launcher_it_wrote_was_changed(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    assert claude.cli("install", "--codex-broker", str(stand_in_broker(claude.tmp))).returncode == 0
    edited = broker_file(root).read_bytes() + b"// edited\n"
    broker_file(root).write_bytes(edited)
    code, out = claude.json("uninstall")
    assert code == 1 and "not the launcher" in out["copies"][0]["message"]  # type: ignore[index]
    assert broker_file(root).read_bytes() == edited


def test_uninstall_restores_from_the_copy_beside_when_the_backup_is_gone(claude: Claude) -> None:
    root = claude.add_version("1.0.5")
    assert claude.cli("install", "--codex-broker", str(stand_in_broker(claude.tmp))).returncode == 0
    shutil.rmtree(claude.tmp / "state")
    assert claude.cli("uninstall", "--plugin-dir", str(root)).returncode == 0
    assert broker_file(root).read_bytes() == FAKE_ORIGINAL.read_bytes()
    assert not (root / "scripts" / companion.ORIGINAL_NAME).exists()


# -- the launcher, run by node ---------------------------------------------------------------------
@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    directory: Path
    log: Path

    @property
    def jsonl(self) -> Path:
        return self.directory / "broker.sock"

    @property
    def grpc(self) -> Path:
        return self.directory / companion.GRPC_SOCKET_NAME

    def events(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def wait_ready(self) -> None:
        wait_for(lambda: _accepts(self.jsonl), WAIT, "the JSONL socket to accept")

    def wait(self) -> int:
        return self.proc.wait(timeout=WAIT)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


@pytest.fixture
def plugin(claude: Claude) -> Iterator[tuple[Claude, Path]]:
    root = claude.add_version("1.0.5")
    assert claude.cli("install", "--codex-broker", str(stand_in_broker(claude.tmp))).returncode == 0
    yield claude, root


@pytest.fixture
def launch(plugin: tuple[Claude, Path]) -> Iterator[object]:
    claude, root = plugin
    started: list[Launched] = []

    def run(*, mode: str = "serve", equals: bool = False, endpoint: str | None = None,
            extra_env: dict[str, str] | None = None, taken: socket.socket | None = None) -> Launched:
        directory = Path(tempfile.mkdtemp(prefix="cxc-", dir="/tmp"))
        if taken is not None:  # something else already listens on the companion's endpoint
            taken.bind(str(directory / "broker.sock"))
            taken.listen()
        log = claude.tmp / f"events-{len(started)}.jsonl"
        endpoint = endpoint or f"unix:{directory}/broker.sock"
        options = {"--endpoint": endpoint, "--cwd": str(claude.tmp), "--pid-file": f"{directory}/broker.pid"}
        argv = [a for k, v in options.items() for a in ([f"{k}={v}"] if equals else [k, v])]
        env = {**claude.env, "STAND_IN_MODE": mode, "STAND_IN_LOG": str(log), "FAKE_ORIGINAL_LOG": str(log),
               **(extra_env or {})}
        with open(directory / "broker.log", "ab") as out:
            proc = subprocess.Popen(["node", str(broker_file(root)), "serve", *argv], cwd=claude.tmp, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        launched = Launched(proc, directory, log)
        started.append(launched)
        return launched

    yield run
    for launched in started:
        if launched.proc.poll() is None:
            with _suppress_gone():
                os.killpg(launched.proc.pid, signal.SIGKILL)
            launched.proc.wait(timeout=WAIT)
        shutil.rmtree(launched.directory, ignore_errors=True)


class _suppress_gone:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return kind is ProcessLookupError


@pytest.mark.parametrize("equals", [False, True], ids=["k-v", "k=v"])
def test_launcher_runs_codex_broker_on_the_companion_endpoint_with_a_grpc_socket_beside_it(
        launch: object, equals: bool) -> None:
    run = launch  # type: ignore[assignment]
    launched: Launched = run(equals=equals)  # type: ignore[operator]
    launched.wait_ready()
    [start] = launched.events()
    argv = start["argv"]
    assert isinstance(argv, list) and argv[0] == "serve"
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options["--jsonl-endpoint"] == f"unix:{launched.jsonl}"
    assert options["--endpoint"] == f"unix:{launched.grpc}"
    assert options["--pid-file"] == f"{launched.directory}/broker.pid"
    assert options["--cwd"] == str(Path(launched.log).parent)
    assert len(options["--instance-id"]) == 36
    assert start["pgid"] == launched.proc.pid  # in the launcher's own group
    assert launched.grpc.is_socket()


def test_a_group_sigterm_stops_launcher_and_broker_and_the_launcher_exits_with_the_broker_status(
        launch: object) -> None:
    launched: Launched = launch(extra_env={"STAND_IN_EXIT": "7"})  # type: ignore[operator]
    launched.wait_ready()
    os.killpg(launched.proc.pid, signal.SIGTERM)
    assert launched.wait() == 7
    assert [e["event"] for e in launched.events()] == ["start", "SIGTERM"]
    assert sorted(p.name for p in launched.directory.iterdir()) == ["broker.log"]


def test_a_sigterm_to_the_launcher_alone_is_forwarded_to_the_broker(launch: object) -> None:
    launched: Launched = launch()  # type: ignore[operator]
    launched.wait_ready()
    launched.proc.send_signal(signal.SIGINT)  # forwarded as SIGTERM: one drain request
    assert launched.wait() == 0
    assert [e["event"] for e in launched.events()] == ["start", "SIGTERM"]


def test_launcher_falls_back_to_the_original_when_codex_broker_cannot_be_spawned(
        launch: object, plugin: tuple[Claude, Path]) -> None:
    claude, _ = plugin
    (claude.tmp / "codex-broker").unlink()
    launched: Launched = launch()  # type: ignore[operator]
    launched.wait_ready()
    events = launched.events()
    assert [e["event"] for e in events] == ["original"]
    assert events[0]["pid"] == launched.proc.pid  # the original runs in the launcher's process
    assert events[0]["argv"] == ["serve", "--endpoint", f"unix:{launched.jsonl}", "--cwd", str(claude.tmp),
                                 "--pid-file", f"{launched.directory}/broker.pid"]
    assert "running the original Node broker" in (launched.directory / "broker.log").read_text()
    launched.proc.send_signal(signal.SIGTERM)
    assert launched.wait() == 0


def test_launcher_falls_back_when_codex_broker_exits_before_its_socket_accepts(launch: object) -> None:
    launched: Launched = launch(mode="exit")  # type: ignore[operator]
    launched.wait_ready()
    assert [e["event"] for e in launched.events()] == ["start", "original"]
    assert "exited with status 3" in (launched.directory / "broker.log").read_text()


def test_an_endpoint_something_else_listens_on_is_left_alone(launch: object) -> None:
    with socket.socket(socket.AF_UNIX) as taken:
        launched: Launched = launch(mode="exit", taken=taken)  # type: ignore[operator]
        assert launched.wait() == 3  # it accepted, so the broker's own exit is the launcher's
        assert [e["event"] for e in launched.events()] == ["start"]
        assert _accepts(launched.jsonl)


def test_launcher_falls_back_for_a_pipe_endpoint_without_running_codex_broker(launch: object) -> None:
    launched: Launched = launch(endpoint="pipe:\\\\.\\pipe\\cxc-codex-app-server")  # type: ignore[operator]
    assert launched.wait() == 0  # the fake original has nothing to listen on
    assert [e["event"] for e in launched.events()] == ["original"]


def test_launcher_plans_the_original_on_windows_and_for_arguments_it_does_not_know(plugin: tuple[Claude, Path]
                                                                                   ) -> None:
    _, root = plugin
    script = (f"import {{plan}} from {json.dumps(str(broker_file(root)))};\n"
              "const a = ['serve', '--endpoint', 'unix:/tmp/d/broker.sock'];\n"
              "console.log(JSON.stringify([plan(a, 'win32').mode, plan(a, 'linux').mode, "
              "plan([...a, '--verbose'], 'linux').mode, plan(['status'], 'linux').mode, "
              "plan(['serve', '--endpoint=unix:/tmp/d/grpc.sock'], 'linux').mode, "
              "plan(['serve', '--endpoint=unix:a=b/broker.sock'], 'linux').jsonlPath]));\n")
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=WAIT,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["original", "broker", "original", "original", "original", "/a=b/broker.sock"]


def test_launcher_never_falls_back_after_its_ready_budget(launch: object) -> None:
    late = str(companion.READY_BUDGET_MS / 1000 + 0.4)
    launched: Launched = launch(mode="late", extra_env={"STAND_IN_DELAY": late})  # type: ignore[operator]
    assert launched.wait() == 5
    assert [e["event"] for e in launched.events()] == ["start"]


def test_launcher_removes_the_grpc_socket_and_the_directory_the_companion_emptied(launch: object) -> None:
    launched: Launched = launch(mode="linger")  # type: ignore[operator]
    launched.wait_ready()
    os.killpg(launched.proc.pid, signal.SIGTERM)  # the companion's teardown, then its clean-up:
    for name in ("broker.pid", "broker.log", "broker.sock"):
        (launched.directory / name).unlink()
    with pytest.raises(OSError):
        launched.directory.rmdir()  # the broker's gRPC socket is still there
    assert launched.wait() == 0
    assert not launched.directory.exists()


# -- the pure decisions, row by row -----------------------------------------------------------------
LAUNCHER = companion.render_launcher(companion.LauncherConfig(codex_broker="/opt/codex-broker"))
OLD_LAUNCHER = companion.render_launcher(companion.LauncherConfig(codex_broker="/old/codex-broker"))
ORIGINAL = b"// the upstream broker\n"
KNOWN = {companion.sha256(ORIGINAL)}


def test_classify_tells_an_original_our_launcher_an_edited_launcher_and_anything_else() -> None:
    assert companion.classify(ORIGINAL, KNOWN, None).kind is companion.Kind.ORIGINAL
    ours = companion.classify(LAUNCHER, KNOWN, None)
    assert ours.kind is companion.Kind.LAUNCHER and ours.launcher == companion.LauncherConfig("/opt/codex-broker")
    edited = LAUNCHER.replace(b"process.exit(code ?? 1)", b"process.exit(0)")
    assert companion.classify(edited, KNOWN, None).kind is companion.Kind.UNKNOWN
    # a launcher from another version of the template is ours only by the sha256 recorded at install
    assert companion.classify(edited, KNOWN, companion.sha256(edited)).kind is companion.Kind.LAUNCHER
    assert companion.classify(b"anything", KNOWN, None).kind is companion.Kind.UNKNOWN


@pytest.mark.parametrize(("data", "force", "marketplace", "action"), [
    (ORIGINAL, False, False, companion.Action.PATCH),
    (LAUNCHER, False, False, companion.Action.NOTHING),
    (OLD_LAUNCHER, False, False, companion.Action.UPDATE),
    (b"unknown", False, False, companion.Action.REFUSE),
    (b"unknown", True, False, companion.Action.PATCH),
    (ORIGINAL, True, True, companion.Action.REFUSE),
])
def test_decide_install(data: bytes, force: bool, marketplace: bool, action: companion.Action) -> None:
    observed = companion.classify(data, KNOWN, None)
    assert companion.decide_install(observed, LAUNCHER, force, marketplace).action is action


@pytest.mark.parametrize("kind", [companion.Kind.MISSING, companion.Kind.SYMLINK, companion.Kind.NOT_REGULAR,
                                  companion.Kind.FOREIGN])
def test_files_that_are_not_regular_files_of_ours_are_refused_by_every_decision(kind: companion.Kind) -> None:
    observed = companion.Observation(kind)
    assert companion.decide_install(observed, LAUNCHER, True, False).action is companion.Action.REFUSE
    assert companion.decide_uninstall(observed, ORIGINAL, False).action is companion.Action.REFUSE


@pytest.mark.parametrize(("data", "backup", "action"), [
    (LAUNCHER, ORIGINAL, companion.Action.RESTORE),
    (LAUNCHER, None, companion.Action.REFUSE),
    (ORIGINAL, ORIGINAL, companion.Action.NOTHING),
    (b"unknown", ORIGINAL, companion.Action.REFUSE),
])
def test_decide_uninstall(data: bytes, backup: bytes | None, action: companion.Action) -> None:
    observed = companion.classify(data, KNOWN, None)
    assert companion.decide_uninstall(observed, backup, False).action is action


# -- the launcher in front of the real codex-broker -------------------------------------------------
def _jsonl_exchange(path: Path, *messages: dict[str, object]) -> list[dict[str, object]]:
    """Send requests (and notifications) on one JSONL connection; the answers to the requests, in order."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        answers = []
        for message in messages:
            stream.write(json.dumps(message).encode() + b"\n")
            stream.flush()
            while "id" in message:
                reply = json.loads(stream.readline())
                if reply.get("id") == message["id"]:
                    answers.append(reply)
                    break
        return answers


def test_the_launcher_serves_the_companion_through_the_real_codex_broker(claude: Claude) -> None:
    from lifecycle.client import BrokerClient

    root = claude.add_version("1.0.5")
    assert claude.cli("install").returncode == 0  # this installation's codex-broker
    marker = f"cxcomp{os.getpid()}x{id(claude)}"
    directory = Path(tempfile.mkdtemp(prefix="cxc-", dir="/tmp"))
    env = {**claude.env, "FAKE_ORIGINAL_LOG": str(claude.tmp / "original.log"),
           "CODEX_BROKER_APP_SERVER": f"{sys.executable} {ROOT / 'tests' / 'fake_app_server.py'} --marker={marker}"}
    with open(directory / "broker.log", "ab") as out:
        launcher = subprocess.Popen(["node", str(broker_file(root)), "serve",
                                     f"--endpoint=unix:{directory}/broker.sock", "--cwd", str(claude.tmp),
                                     "--pid-file", str(directory / "broker.pid")],
                                    cwd=claude.tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
    try:
        launched = Launched(launcher, directory, claude.tmp / "original.log")
        launched.wait_ready()
        init, thread = _jsonl_exchange(launched.jsonl, {"id": 1, "method": "initialize", "params": {
            "clientInfo": {"name": "companion-test", "version": "1"}}}, {"method": "initialized"},
            {"id": 2, "method": "thread/start", "params": {"cwd": str(claude.tmp)}})
        assert "result" in init and thread["result"]["thread"]["id"]  # type: ignore[index]
        with BrokerClient(f"unix:{launched.grpc}") as client:
            assert client.health(timeout=WAIT) == "SERVING"
            status = client.status(timeout=WAIT)
        assert os.getpgid(status.pid) == launcher.pid  # the broker: in the launcher's group
        assert os.getpgid(status.app_server_pid) != launcher.pid  # its app-server: in a group of its own
        assert status.instance_id and (directory / "broker.pid").read_text().strip() == str(status.pid)

        [shutdown] = _jsonl_exchange(launched.jsonl, {"id": 3, "method": "broker/shutdown", "params": {}})
        assert shutdown == {"id": 3, "result": {}}
        os.killpg(launcher.pid, signal.SIGTERM)  # then the companion's clean-up, at once
        for name in ("broker.pid", "broker.log", "broker.sock"):
            (directory / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()
        assert launcher.wait(timeout=WAIT) == 0
        assert not directory.exists()
        assert not (claude.tmp / "original.log").exists()  # the original Node broker never ran
        wait_for(lambda: not processes_with(marker), WAIT, "the app-server to be gone")
    finally:
        if launcher.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=WAIT)
        shutil.rmtree(directory, ignore_errors=True)
