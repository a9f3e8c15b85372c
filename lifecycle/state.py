"""Per-workspace broker state: ``broker.json``, a lock file and a short rotation history.

Everything ensure decides rests on these files, so they are written atomically (temp file in
the same directory, fsync, rename) and a corrupt record is moved aside, logged and treated as
missing: a broken file must never wedge the workspace or crash the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import filelock

from lifecycle.errors import StateError
from lifecycle.settings import Settings
from proxy.contract import HISTORY_NAME, LOCK_NAME, RECORD_NAME, WORKSPACES_DIR_NAME

log = logging.getLogger("codex_broker.lifecycle")

HISTORY_LIMIT = 50


# --- locations ----------------------------------------------------------------------------------


def state_root(env: Mapping[str, str] | None = None) -> Path:
    """The state root, from ``CODEX_BROKER_STATE_DIR`` or the user's state dir; created 0700."""
    root = Settings.from_env(env).state_root
    _make_private_dir(root)
    return root


def workspace_key(cwd: str | os.PathLike[str]) -> str:
    """A readable, stable key for a workspace: ``<slug of basename>-<12 hex of sha256>``.

    Keyed by the real path, so a symlink and its target share one broker, and two folders with
    the same name elsewhere do not.
    """
    real = os.path.realpath(os.fspath(cwd))
    slug = re.sub(r"[^a-z0-9]+", "-", os.path.basename(real).lower()).strip("-")[:32].strip("-")
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:12]
    return f"{slug or 'root'}-{digest}"


def _make_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing; refuse something that is not our directory."""
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateError(f"cannot create state directory {path}: {exc}") from exc
    if not path.is_dir():
        raise StateError(f"state path {path} exists and is not a directory")
    if path.stat().st_uid != os.getuid():
        raise StateError(f"state directory {path} is owned by another user; refusing to use it")


# --- the record ---------------------------------------------------------------------------------

_STR_FIELDS = ("endpoint", "instance_id", "session_dir", "log_file", "version", "codex_home", "cwd")
_FLOAT_FIELDS = ("create_time", "started_at")


@dataclass(frozen=True)
class BrokerRecord:
    """What a spawn recorded about its broker; enough to find, verify and stop it later."""

    endpoint: str
    pid: int
    create_time: float
    instance_id: str
    started_at: float
    session_dir: str
    log_file: str
    version: str
    app_server_command: list[str]
    codex_home: str
    cwd: str
    app_server_pid: int | None = None
    app_server_create_time: float | None = None
    # Written by a spawn before it waits for SERVING (``started_at`` is then when the spawn
    # began); cleared when the broker is ready. An ensure killed mid-spawn leaves it set.
    starting: bool = False
    # The broker's JSONL front end (``unix:PATH`` beside its gRPC socket); "" for a broker
    # recorded without one.
    jsonl_endpoint: str = ""
    # The max age the broker was spawned with (serve --max-age-hours), in seconds; None in a
    # record written before brokers were given one.
    max_age_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps``."""
        data = dataclasses.asdict(self)
        data["app_server_command"] = list(self.app_server_command)
        return data

    @classmethod
    def from_json(cls, data: object) -> BrokerRecord:
        """Validate and build; raises ValueError naming the first bad field.

        Unknown keys are ignored so an older client can read a newer broker's record.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        fields: dict[str, Any] = {name: _require_str(data, name) for name in _STR_FIELDS}
        fields.update({name: _require_float(data, name) for name in _FLOAT_FIELDS})
        fields["pid"] = _require_pid(data, "pid")
        fields["app_server_command"] = _require_command(data)
        fields["app_server_pid"] = (
            None if data.get("app_server_pid") is None else _require_pid(data, "app_server_pid")
        )
        fields["app_server_create_time"] = (
            None
            if data.get("app_server_create_time") is None
            else _require_float(data, "app_server_create_time")
        )
        starting = data.get("starting", False)
        if not isinstance(starting, bool):
            raise ValueError(f"field 'starting' must be true or false, got {starting!r}")
        fields["starting"] = starting
        jsonl_endpoint = data.get("jsonl_endpoint", "")
        if not isinstance(jsonl_endpoint, str):
            raise ValueError(f"field 'jsonl_endpoint' must be a string, got {type(jsonl_endpoint).__name__}")
        fields["jsonl_endpoint"] = jsonl_endpoint
        fields["max_age_seconds"] = (
            None if data.get("max_age_seconds") is None else _require_float(data, "max_age_seconds")
        )
        return cls(**fields)


def _require(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"missing field {name!r}")
    return data[name]


def _require_str(data: dict[str, Any], name: str) -> str:
    value = _require(data, name)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _require_float(data: dict[str, Any], name: str) -> float:
    value = _require(data, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _require_pid(data: dict[str, Any], name: str) -> int:
    """A pid must be a positive int: 0 or -1 would make kill() hit a whole group or every process."""
    value = _require(data, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"field {name!r} must be a positive integer, got {value!r}")
    return value


def _require_command(data: dict[str, Any]) -> list[str]:
    value = _require(data, "app_server_command")
    if not isinstance(value, list) or not value or not all(isinstance(part, str) for part in value):
        raise ValueError(f"field 'app_server_command' must be a non-empty list of strings, got {value!r}")
    return list(value)


# --- rotation history ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One rotation: why the old broker was replaced and by which new one."""

    at: float
    reason: str
    old_instance: str | None = None
    new_instance: str | None = None
    old_pid: int | None = None
    new_pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> HistoryEntry:
        if not isinstance(data, dict) or not isinstance(data.get("at"), int | float):
            raise ValueError("history entry needs an object with a numeric 'at'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --- one workspace ------------------------------------------------------------------------------


class WorkspaceState:
    """The state directory of one workspace, ``<root>/workspaces/<key>/`` (0700)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.corrupt: str | None = None  # what the last read() found wrong, when it was corrupt
        _make_private_dir(self.path)

    @classmethod
    def for_cwd(cls, cwd: str | os.PathLike[str], root: Path | None = None) -> WorkspaceState:
        """The state of the workspace containing ``cwd`` (keyed by its real path)."""
        base = state_root() if root is None else root
        return cls(base / WORKSPACES_DIR_NAME / workspace_key(cwd))

    @property
    def root(self) -> Path:
        """The state root this workspace belongs to (``<root>/workspaces/<key>``), absolute."""
        return Path(os.path.abspath(self.path)).parent.parent

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_NAME

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY_NAME

    def lock(self, timeout: float = -1) -> filelock.FileLock:
        """The exclusive lock ensure holds for its whole decision.

        A fresh object per call with ``thread_local=False``: two threads of one process contend
        like two processes do, and an asyncio caller may release it from another worker thread.
        """
        return filelock.FileLock(self.path / LOCK_NAME, timeout=timeout, mode=0o600, thread_local=False)

    def read(self) -> BrokerRecord | None:
        """The recorded broker, or None when missing or corrupt (corrupt files are moved aside)."""
        try:
            with open(self.record_path, "rb") as f:
                raw = f.read()
                identity = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.record_path}: {exc}") from exc
        try:
            return BrokerRecord.from_json(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            self.corrupt = _describe_corruption(raw, exc)
            self._quarantine(identity, self.corrupt)
            return None

    def write(self, record: BrokerRecord) -> None:
        """Atomically replace ``broker.json`` (0600): readers see the old or the new, never half."""
        text = json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n"
        atomic_write(self.record_path, text.encode("utf-8"))

    def clear(self, record: BrokerRecord) -> bool:
        """Remove ``broker.json`` only if it still names ``record``'s instance.

        Comparing the instance id keeps a slow caller from deleting a newer broker's record.
        Returns True if the file was removed.
        """
        try:
            current = json.loads(self.record_path.read_bytes())
        except (OSError, ValueError):
            return False
        if not isinstance(current, dict) or current.get("instance_id") != record.instance_id:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
            return True
        return False

    def append_history(self, entry: HistoryEntry) -> None:
        """Add a rotation entry, keeping the last 50. Call with the lock held."""
        lines = [json.dumps(e.to_json(), sort_keys=True) for e in self.history()]
        lines.append(json.dumps(entry.to_json(), sort_keys=True))
        atomic_write(self.history_path, ("\n".join(lines[-HISTORY_LIMIT:]) + "\n").encode("utf-8"))

    def history(self) -> list[HistoryEntry]:
        """Rotation entries, oldest first; unreadable lines are skipped (the history is advisory)."""
        try:
            text = self.history_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            try:
                entries.append(HistoryEntry.from_json(json.loads(line)))
            except (ValueError, TypeError):
                log.debug("skipping unreadable history line in %s: %r", self.history_path, line[:80])
        return entries[-HISTORY_LIMIT:]

    def _quarantine(self, identity: os.stat_result, what: str) -> None:
        """Move the corrupt record aside, unless a writer already replaced it with a good one."""
        try:
            now = os.stat(self.record_path)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) != (identity.st_dev, identity.st_ino):
            return  # replaced since we read it: not ours to move
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.record_path.with_name(f"{RECORD_NAME}.corrupt-{stamp}")
        try:
            os.replace(self.record_path, dest)
        except FileNotFoundError:
            return
        log.warning("broker state %s was corrupt (%s); moved aside to %s", self.record_path, what, dest)


def _describe_corruption(raw: bytes, exc: Exception) -> str:
    """Say what was found, so the warning is enough to understand what went wrong."""
    if not raw.strip():
        return f"empty file, {len(raw)} bytes"
    kind = "invalid JSON" if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) else "wrong shape"
    return f"{kind}: {exc}; {len(raw)} bytes starting {raw[:60]!r}"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: readers see the old
    file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable; some filesystems refuse fsync on a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
