"""``codex-broker companion install|uninstall|status``: codex-broker as the Codex companion's broker.

The companion (a Claude Code plugin) starts its broker as ``node <plugin root>/scripts/
app-server-broker.mjs serve --endpoint unix:<dir>/broker.sock --cwd <cwd> --pid-file <dir>/broker.pid``.
``install`` replaces that file with a small Node launcher (``companion_launcher.mjs``, rendered with
this codex-broker's absolute path) that runs ``codex-broker serve --jsonl-endpoint <that endpoint>
--endpoint unix:<dir>/grpc.sock ...`` and falls back to the original, kept beside it as
``app-server-broker.original.mjs`` (the launcher's own header says when). ``uninstall`` puts the
original back byte for byte. Both are idempotent: a second run finds nothing to do.

What each step relies on:

- Copies: without ``--plugin-dir``, Claude Code's own records (``$CLAUDE_CONFIG_DIR``, else
  ``~/.claude``; ``plugins/installed_plugins.json``, each ``installPath`` of ``codex@openai-codex``);
  ``uninstall`` and ``status`` also look at the copies this module recorded at install, so a copy
  Claude Code no longer lists is still found. Nothing under ``plugins/marketplaces`` is touched.
- What a broker file is, is decided from its bytes alone (:func:`classify`): a known upstream
  sha256 (``KNOWN_SHA256``, plus ``CODEX_BROKER_COMPANION_EXTRA_SHA256`` for tests), a launcher
  this module wrote (its exact rendering of the configuration it carries, or the sha256 recorded
  when it was written), or unknown. Only a regular file owned by the user is read at all.
- Decisions are pure (:func:`decide_install`, :func:`decide_uninstall`); the I/O acts on them.
- Every write goes through a temp file in the same directory and a rename; the broker file's
  bytes are checked again, right before, to be the ones the decision saw.
- ``uninstall`` writes only over a launcher it recognizes (as above), and only the bytes whose
  sha256 install recorded (the backup, else the copy kept beside the launcher).
- The original's bytes are backed up outside the plugin cache, in the state root:
  ``companion/<key of the plugin root>/original.mjs`` with ``install.json`` (0600 in 0700 dirs).
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lifecycle.errors import BrokerError, StateError, UsageError
from lifecycle.state import atomic_write

# The companion's broker, app-server-broker.mjs, is byte-identical from 1.0.0 to 1.0.6.
KNOWN_SHA256 = frozenset({
    "08c88af645a853c862c761d594267c227f62e543153d36d0d6a6912f9a843721",
})
EXTRA_SHA256_ENV = "CODEX_BROKER_COMPANION_EXTRA_SHA256"  # comma-separated; tests' fake originals
CLAUDE_CONFIG_ENV = "CLAUDE_CONFIG_DIR"
PLUGIN_ID = "codex@openai-codex"
BROKER_SCRIPT = Path("scripts") / "app-server-broker.mjs"
ORIGINAL_NAME = "app-server-broker.original.mjs"  # the original, kept beside the launcher
GRPC_SOCKET_NAME = "grpc.sock"  # in the companion's broker directory, beside its broker.sock
READY_BUDGET_MS = 1200  # codex-broker's start, inside the companion's 2000 ms readiness window
LAUNCHER_TEMPLATE = "companion_launcher.mjs"
_CONFIG_PLACEHOLDER = "__CODEX_BROKER_CONFIG__"
_CONFIG_PREFIX = "const CONFIG = "
BACKUP_DIR_NAME = "companion"
BACKUP_NAME = "original.mjs"
RECORD_NAME = "install.json"
PROBE_TIMEOUT = 20.0


class CompanionError(BrokerError):
    """No copy of the companion could be found, or its records are unreadable."""


# -- what a broker file is ---------------------------------------------------------------------
class Kind(enum.Enum):
    MISSING = "missing"
    NOT_REGULAR = "not a regular file"
    SYMLINK = "a symlink"
    FOREIGN = "not owned by you"
    ORIGINAL = "original"
    LAUNCHER = "patched"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class LauncherConfig:
    """What a launcher carries: the codex-broker it runs and the names it uses."""

    codex_broker: str
    grpc_socket_name: str = GRPC_SOCKET_NAME
    original: str = ORIGINAL_NAME
    ready_budget_ms: int = READY_BUDGET_MS

    def to_json(self) -> dict[str, Any]:
        return {"codexBroker": self.codex_broker, "grpcSocketName": self.grpc_socket_name,
                "original": self.original, "readyBudgetMs": self.ready_budget_ms}

    @classmethod
    def from_json(cls, data: Any) -> LauncherConfig | None:
        try:
            config = cls(codex_broker=data["codexBroker"], grpc_socket_name=data["grpcSocketName"],
                         original=data["original"], ready_budget_ms=data["readyBudgetMs"])
        except (TypeError, KeyError):
            return None
        types_ok = all(isinstance(v, str) for v in (config.codex_broker, config.grpc_socket_name, config.original))
        return config if types_ok and isinstance(config.ready_budget_ms, int) else None


def launcher_template() -> str:
    return (resources.files("lifecycle") / LAUNCHER_TEMPLATE).read_text(encoding="utf-8")


def render_launcher(config: LauncherConfig, template: str | None = None) -> bytes:
    text = template if template is not None else launcher_template()
    return text.replace(_CONFIG_PLACEHOLDER, json.dumps(config.to_json(), sort_keys=True), 1).encode()


def parse_launcher(data: bytes, template: str | None = None) -> LauncherConfig | None:
    """The configuration of a launcher this module rendered, exactly (any other byte: None)."""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith(_CONFIG_PREFIX) and line.endswith(";"):
            try:
                config = LauncherConfig.from_json(json.loads(line[len(_CONFIG_PREFIX):-1]))
            except ValueError:
                return None
            if config is not None and render_launcher(config, template) == data:
                return config
            return None
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def known_hashes(env: Mapping[str, str]) -> frozenset[str]:
    extra = {h.strip().lower() for h in env.get(EXTRA_SHA256_ENV, "").split(",") if h.strip()}
    return KNOWN_SHA256 | extra


@dataclass(frozen=True)
class Observation:
    """One broker file, as read: its kind, bytes and (for a launcher) what it runs."""

    kind: Kind
    data: bytes | None = None
    launcher: LauncherConfig | None = None
    detail: str = ""

    @property
    def sha256(self) -> str | None:
        return None if self.data is None else sha256(self.data)


def classify(data: bytes, known: Iterable[str], recorded_launcher_sha: str | None,
             template: str | None = None) -> Observation:
    """Pure: what these bytes are. A launcher is ours if it is exactly what we render for the
    configuration it carries, or if its sha256 is the one recorded when we wrote it."""
    digest = sha256(data)
    if digest in set(known):
        return Observation(Kind.ORIGINAL, data)
    config = parse_launcher(data, template)
    if config is not None or (recorded_launcher_sha is not None and digest == recorded_launcher_sha):
        return Observation(Kind.LAUNCHER, data, config)
    return Observation(Kind.UNKNOWN, data)


def observe(path: Path, known: Iterable[str], recorded_launcher_sha: str | None, *,
            uid: int | None = None) -> Observation:
    """Read ``path`` only if it is a regular file owned by ``uid`` (default: ours); lstat first, so
    a symlink is never followed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Observation(Kind.MISSING)
    except OSError as exc:
        return Observation(Kind.MISSING, detail=exc.strerror or str(exc))
    if stat.S_ISLNK(st.st_mode):
        return Observation(Kind.SYMLINK)
    if not stat.S_ISREG(st.st_mode):
        return Observation(Kind.NOT_REGULAR)
    if st.st_uid != (os.getuid() if uid is None else uid):
        return Observation(Kind.FOREIGN, detail=f"owner uid {st.st_uid}")
    return classify(_read_nofollow(path), known, recorded_launcher_sha)


def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


# -- decisions ---------------------------------------------------------------------------------
class Action(enum.Enum):
    PATCH = "patch"
    UPDATE = "update"
    RESTORE = "restore"
    NOTHING = "nothing"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide_install(obs: Observation, wanted: bytes, force: bool, in_marketplace: bool) -> Decision:
    """Pure: what ``install`` does with a broker file it observed."""
    if in_marketplace:
        return Decision(Action.REFUSE, "it is inside Claude Code's marketplace clone, which is never modified")
    if obs.kind in (Kind.MISSING, Kind.NOT_REGULAR, Kind.SYMLINK, Kind.FOREIGN):
        return Decision(Action.REFUSE, f"{BROKER_SCRIPT} is {obs.kind.value}{_detail(obs)}")
    if obs.kind is Kind.ORIGINAL:
        return Decision(Action.PATCH, "patched (the broker was a known upstream version)")
    if obs.kind is Kind.LAUNCHER:
        if obs.data == wanted:
            return Decision(Action.NOTHING, "already patched")
        return Decision(Action.UPDATE, "patched again (the launcher of an earlier install was rewritten)")
    if force:
        return Decision(Action.PATCH, f"patched because of --force (the broker was unknown, sha256 {obs.sha256})")
    return Decision(Action.REFUSE, f"unknown {BROKER_SCRIPT} (sha256 {obs.sha256}): not a known upstream version; "
                                   "--force patches it anyway")


def decide_uninstall(obs: Observation, backup: bytes | None, in_marketplace: bool) -> Decision:
    """Pure: what ``uninstall`` does. It restores only over a launcher it wrote, from a backup."""
    if in_marketplace:
        return Decision(Action.REFUSE, "it is inside Claude Code's marketplace clone, which is never modified")
    if obs.kind in (Kind.MISSING, Kind.NOT_REGULAR, Kind.SYMLINK, Kind.FOREIGN):
        return Decision(Action.REFUSE, f"{BROKER_SCRIPT} is {obs.kind.value}{_detail(obs)}")
    if obs.kind is Kind.ORIGINAL:
        return Decision(Action.NOTHING, "not patched")
    if obs.kind is Kind.UNKNOWN:
        return Decision(Action.REFUSE, f"{BROKER_SCRIPT} is not the launcher codex-broker wrote "
                                       f"(sha256 {obs.sha256}); nothing was changed")
    if backup is None:
        return Decision(Action.REFUSE, "patched, but no backup of the original was found; nothing was changed")
    return Decision(Action.RESTORE, "restored the original")


def _detail(obs: Observation) -> str:
    return f" ({obs.detail})" if obs.detail else ""


# -- copies ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Copy:
    root: Path
    version: str | None = None

    @property
    def broker(self) -> Path:
        return self.root / BROKER_SCRIPT

    @property
    def original(self) -> Path:
        return self.broker.with_name(ORIGINAL_NAME)


def claude_config_dir(env: Mapping[str, str]) -> Path:
    configured = env.get(CLAUDE_CONFIG_ENV)
    if configured:
        return Path(os.path.expanduser(configured))
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".claude"


def claude_copies(env: Mapping[str, str]) -> list[Copy]:
    """The companion's installed copies, from Claude Code's ``installed_plugins.json``."""
    config = claude_config_dir(env)
    path = config / "plugins" / "installed_plugins.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CompanionError(f"cannot read {path}: {exc}") from None
    entries = data.get("plugins", {}).get(PLUGIN_ID, []) if isinstance(data, dict) else []
    copies: list[Copy] = []
    for entry in entries if isinstance(entries, list) else []:
        where = entry.get("installPath") if isinstance(entry, dict) else None
        if isinstance(where, str) and where:
            root = Path(os.path.expanduser(where))
            version = entry.get("version")
            copies.append(Copy(root if root.is_absolute() else config / root,
                               version if isinstance(version, str) else None))
    return _unique(copies)


def _unique(copies: Iterable[Copy]) -> list[Copy]:
    seen: set[str] = set()
    result = []
    for copy in copies:
        key = os.path.realpath(copy.root)
        if key not in seen:
            seen.add(key)
            result.append(copy)
    return result


def in_marketplace(root: Path, env: Mapping[str, str]) -> bool:
    marketplaces = os.path.realpath(claude_config_dir(env) / "plugins" / "marketplaces")
    real = os.path.realpath(root)
    return real == marketplaces or real.startswith(marketplaces + os.sep)


# -- backups in the state root -------------------------------------------------------------------
@dataclass
class Backup:
    """What install recorded for one plugin root: the original's bytes and the launcher's sha256."""

    directory: Path
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_root(cls, root: Path, env: Mapping[str, str]) -> Backup:
        from lifecycle.state import state_root

        key = sha256(os.fsencode(os.path.realpath(root)))[:16]
        backup = cls(state_root(env) / BACKUP_DIR_NAME / key)
        backup.record = _read_record(backup.directory / RECORD_NAME)
        return backup

    @property
    def launcher_sha256(self) -> str | None:
        value = self.record.get("launcher_sha256")
        return value if isinstance(value, str) else None

    def original(self) -> bytes | None:
        """The backed-up original, only if its bytes still have the recorded sha256."""
        wanted = self.record.get("original_sha256")
        try:
            data = _read_nofollow(self.directory / BACKUP_NAME)
        except OSError:
            return None
        return data if isinstance(wanted, str) and sha256(data) == wanted else None

    def save(self, root: Path, original: bytes, launcher: bytes) -> None:
        _private_dir(self.directory.parent)
        _private_dir(self.directory)
        atomic_write(self.directory / BACKUP_NAME, original, 0o600)
        self.record = {"plugin_root": str(root), "original_sha256": sha256(original),
                       "launcher_sha256": sha256(launcher), "installed_at": time.time()}
        atomic_write(self.directory / RECORD_NAME, json.dumps(self.record, indent=2).encode() + b"\n", 0o600)

    def remove(self) -> None:
        for name in (BACKUP_NAME, RECORD_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()


def recorded_roots(env: Mapping[str, str]) -> list[Copy]:
    """Plugin roots that install recorded and that still exist."""
    from lifecycle.state import state_root

    base = state_root(env) / BACKUP_DIR_NAME
    copies = []
    for record_path in sorted(base.glob(f"*/{RECORD_NAME}")):
        root = _read_record(record_path).get("plugin_root")
        if isinstance(root, str) and os.path.isdir(root):
            copies.append(Copy(Path(root)))
    return copies


def _read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _private_dir(path: Path) -> None:
    """``path`` (its parent exists) as a 0700 directory of ours; StateError for anything else."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise StateError(f"{path} is not a directory of yours")
    os.chmod(path, 0o700)



def _replace_if_unchanged(path: Path, expected: bytes, data: bytes) -> None:
    """Write ``data`` over ``path`` (keeping its mode) unless its bytes changed since they were read."""
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode) or _read_nofollow(path) != expected:
        raise CompanionError(f"{path} changed while it was being replaced; nothing was written")
    atomic_write(path, data, stat.S_IMODE(st.st_mode))


# -- codex-broker itself -------------------------------------------------------------------------
def default_codex_broker() -> str:
    """This installation's codex-broker: the script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("codex-broker")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("codex-broker")
    if found is None:
        raise UsageError("cannot find codex-broker beside this Python or on PATH; pass --codex-broker PATH")
    return os.path.abspath(found)


@dataclass(frozen=True)
class Runnable:
    runnable: bool
    serves_jsonl: bool
    detail: str = ""


def probe(codex_broker: str) -> Runnable:
    """Whether ``codex-broker serve --help`` runs, and whether that serve has --jsonl-endpoint."""
    try:
        done = subprocess.run([codex_broker, "serve", "--help"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT, errors="replace")
    except (OSError, subprocess.SubprocessError) as exc:
        return Runnable(False, False, str(exc))
    if done.returncode != 0:
        return Runnable(False, False, f"serve --help exited with status {done.returncode}")
    return Runnable(True, "--jsonl-endpoint" in done.stdout)


# -- the commands ----------------------------------------------------------------------------------
@dataclass
class Result:
    """One copy's outcome, as ``--json`` prints it."""

    plugin_root: str
    version: str | None
    state: str
    action: str
    ok: bool
    message: str
    codex_broker: str | None = None
    runnable: bool | None = None
    serves_jsonl: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_copies(env: Mapping[str, str], plugin_dir: str | None, *, with_recorded: bool) -> list[Copy]:
    """The copies to act on; CompanionError when there is none."""
    if plugin_dir is not None:
        return [Copy(Path(os.path.abspath(os.path.expanduser(plugin_dir))))]
    copies = claude_copies(env)
    if with_recorded:
        copies = _unique([*copies, *recorded_roots(env)])
    if not copies:
        where = claude_config_dir(env) / "plugins" / "installed_plugins.json"
        raise CompanionError(f"no installed copy of the Codex companion ({PLUGIN_ID}) found in {where}; "
                             "pass --plugin-dir DIR")
    return copies


def install(copy: Copy, env: Mapping[str, str], codex_broker: str, force: bool) -> Result:
    backup = Backup.for_root(copy.root, env)
    obs = observe(copy.broker, known_hashes(env), backup.launcher_sha256)
    wanted = render_launcher(LauncherConfig(codex_broker=codex_broker))
    decision = decide_install(obs, wanted, force, in_marketplace(copy.root, env))
    result = Result(str(copy.root), copy.version, obs.kind.value, decision.action.value,
                    decision.action is not Action.REFUSE, decision.reason, codex_broker)
    if decision.action is Action.REFUSE:
        return result
    assert obs.data is not None
    original = obs.data if decision.action is Action.PATCH else _original_for(copy, backup, env)
    if original is None:
        return _refused(result, "patched, but the original is neither backed up nor kept beside the launcher; "
                                "nothing was changed")
    try:
        backup.save(copy.root, original, wanted)
        if not _holds(copy.original, original):
            atomic_write(copy.original, original, stat.S_IMODE(copy.broker.lstat().st_mode))
            if decision.action is Action.NOTHING:
                result.message += f"; the original kept beside it ({ORIGINAL_NAME}) was put back"
        if decision.action is not Action.NOTHING:
            _replace_if_unchanged(copy.broker, obs.data, wanted)
        result.state = Kind.LAUNCHER.value
    except (OSError, CompanionError) as exc:
        return _refused(result, f"failed: {exc}")
    return result


def uninstall(copy: Copy, env: Mapping[str, str]) -> Result:
    backup = Backup.for_root(copy.root, env)
    obs = observe(copy.broker, known_hashes(env), backup.launcher_sha256)
    original = _original_for(copy, backup, env) if obs.kind is Kind.LAUNCHER else None
    decision = decide_uninstall(obs, original, in_marketplace(copy.root, env))
    result = Result(str(copy.root), copy.version, obs.kind.value, decision.action.value,
                    decision.action is not Action.REFUSE, decision.reason,
                    obs.launcher.codex_broker if obs.launcher else None)
    try:
        if decision.action is Action.RESTORE:
            assert obs.data is not None and original is not None
            _replace_if_unchanged(copy.broker, obs.data, original)
            result.state = Kind.ORIGINAL.value
        if decision.action in (Action.RESTORE, Action.NOTHING):
            restored = _read_nofollow(copy.broker)
            if _holds(copy.original, restored):
                copy.original.unlink()
            if backup.original() in (restored, None):
                backup.remove()
    except (OSError, CompanionError) as exc:
        return _refused(result, f"failed: {exc}")
    return result


def status(copy: Copy, env: Mapping[str, str], default_broker: str | None,
           probes: dict[str, Runnable]) -> Result:
    backup = Backup.for_root(copy.root, env)
    obs = observe(copy.broker, known_hashes(env), backup.launcher_sha256)
    broker = obs.launcher.codex_broker if obs.launcher else default_broker
    if obs.kind is Kind.LAUNCHER:
        message = "patched" if obs.launcher else "patched (launcher of an older install; install rewrites it)"
        if not copy.original.is_file():
            message += f"; the original kept beside it ({ORIGINAL_NAME}) is missing, so nothing to fall back to " \
                       "(install puts it back)"
    elif obs.kind is Kind.ORIGINAL:
        message = "not patched (the upstream broker)"
    else:
        message = f"{BROKER_SCRIPT} is {obs.kind.value}{_detail(obs)}"
    result = Result(str(copy.root), copy.version, obs.kind.value, "none", obs.kind in (Kind.LAUNCHER, Kind.ORIGINAL),
                    message, broker)
    if broker is not None:
        if broker not in probes:
            probes[broker] = probe(broker)
        result.runnable, result.serves_jsonl = probes[broker].runnable, probes[broker].serves_jsonl
    return result


def _original_for(copy: Copy, backup: Backup, env: Mapping[str, str]) -> bytes | None:
    """The original to restore: the backup, else the copy kept beside the launcher if its bytes are
    the recorded original's or a known upstream version."""
    saved = backup.original()
    if saved is not None:
        return saved
    try:
        beside = observe(copy.original, known_hashes(env), None)
    except OSError:
        return None
    recorded = backup.record.get("original_sha256")
    if beside.data is not None and (beside.kind is Kind.ORIGINAL or beside.sha256 == recorded):
        return beside.data
    return None


def _holds(path: Path, data: bytes) -> bool:
    try:
        st = path.lstat()
        return stat.S_ISREG(st.st_mode) and _read_nofollow(path) == data
    except OSError:
        return False


def _refused(result: Result, message: str) -> Result:
    result.ok = False
    result.action = Action.REFUSE.value
    result.message = message
    return result


def describe(result: Result) -> str:
    """One line for people."""
    version = f" ({result.version})" if result.version else ""
    text = f"{result.plugin_root}{version}: {result.message}"
    if result.codex_broker and result.runnable is not None:
        how = "runnable" if result.runnable else "NOT runnable"
        jsonl = ", serves JSONL" if result.serves_jsonl else ", without --jsonl-endpoint (the launcher falls back)"
        text += f"; codex-broker {result.codex_broker} {how}{jsonl if result.runnable else ''}"
    return text
