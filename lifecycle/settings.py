"""The lifecycle's settings: everything it takes from the environment, read once from one mapping.

``Settings.from_env(env)`` copies the mapping; each value is parsed the first time it is asked for
(a bad ``CODEX_BROKER_APP_SERVER`` must not stop ``gc``, which never spawns) and kept. Paths are
computed here; the directories are created (and their ownership checked) only by
:meth:`Settings.runtime_dir` and by ``lifecycle.state.state_root``.

The runtime directory holds every spawned broker's session directory, so its path must be short
(unix socket paths are limited to 107 bytes) and private. Its default, ``/tmp/codex-broker-<uid>``,
lives in a directory every local user can write to: another user may create it first. Refusing
that squatted directory is right, refusing forever is not, so the lifecycle then falls back to
``/tmp/codex-broker-<uid>-<key>``, where ``key`` is kept in the private state root: every caller of
this user reads the same key (and finds the same brokers), and no other user can read it to squat
that name ahead."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import platformdirs

from lifecycle.errors import StateError, UsageError
from proxy import contract

log = logging.getLogger("codex_broker.lifecycle")

STATE_DIR_ENV = "CODEX_BROKER_STATE_DIR"
RUNTIME_DIR_ENV = "CODEX_BROKER_RUNTIME_DIR"
SPAWN_TIMEOUT_ENV = "CODEX_BROKER_SPAWN_TIMEOUT"
DEFAULT_TMP_BASE = Path("/tmp")
_KEY_HEX = 8


@dataclass(frozen=True, eq=False)
class Settings:
    """The lifecycle's view of one environment. ``tmp_base`` is where the default runtime directory
    goes when ``XDG_RUNTIME_DIR`` is unset (``/tmp``)."""

    env: Mapping[str, str] = field(default_factory=dict)
    tmp_base: Path = DEFAULT_TMP_BASE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, tmp_base: Path | None = None) -> Settings:
        return cls(env=dict(os.environ if env is None else env), tmp_base=tmp_base or DEFAULT_TMP_BASE)

    @cached_property
    def state_root(self) -> Path:
        """``CODEX_BROKER_STATE_DIR``, else the user's state directory (not created here)."""
        override = self.env.get(STATE_DIR_ENV)
        if override:
            return Path(os.path.abspath(os.path.expanduser(override)))
        return platformdirs.user_state_path("codex-broker")

    @cached_property
    def app_server_command(self) -> list[str]:
        """The app-server command spawned brokers run: the same rule as ``serve`` (proxy.cli)."""
        from proxy.cli import split_app_server

        try:
            return split_app_server(None, self.env)
        except ValueError as exc:
            raise UsageError(f"CODEX_BROKER_APP_SERVER: {exc}") from None

    @cached_property
    def codex_home(self) -> str:
        return contract.resolve_codex_home(self.env)

    @cached_property
    def max_age_seconds(self) -> float:
        from lifecycle.decide import max_age_seconds

        return max_age_seconds(self.env)

    @cached_property
    def spawn_timeout(self) -> float:
        """Seconds a spawned broker has to be SERVING (``CODEX_BROKER_SPAWN_TIMEOUT``, default 30);
        gc leaves brokers and session directories younger than this alone."""
        raw = self.env.get(SPAWN_TIMEOUT_ENV, "").strip()
        if not raw:
            return contract.SPAWN_TIMEOUT
        value = contract.finite_nonneg(raw)
        if value is None:
            raise UsageError(f"{SPAWN_TIMEOUT_ENV}={raw!r} is not a number of seconds >= 0")
        return value

    @cached_property
    def _runtime_dir(self) -> Path:
        explicit = self.env.get(RUNTIME_DIR_ENV)
        if explicit:
            return _require_private(Path(explicit))
        xdg = self.env.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg):
            return _require_private(Path(xdg) / contract.RUNTIME_DIR_NAME)
        default = self.default_runtime_dir
        problem = _claim_private_dir(default)
        if problem is None:
            return default
        fallback = self.tmp_base / f"codex-broker-{os.getuid()}-{self._runtime_key()}"
        log.warning("runtime directory %s is not usable (%s); using %s instead", default, problem, fallback)
        return _require_private(fallback)

    @property
    def default_runtime_dir(self) -> Path:
        return self.tmp_base / f"codex-broker-{os.getuid()}"

    def runtime_dir(self) -> Path:
        """Where session directories live; created 0700. An explicit ``CODEX_BROKER_RUNTIME_DIR``
        (or ``$XDG_RUNTIME_DIR/codex-broker``) that is not private and ours is refused with
        StateError; the ``/tmp`` default falls back to a private name of our own (module doc)."""
        return self._runtime_dir

    def _runtime_key(self) -> str:
        """The key naming the fallback runtime dir, kept 0600 in the state root (created once,
        atomically: concurrent first callers all end up with the winner's key)."""
        from lifecycle.state import state_root

        path = state_root(self.env) / contract.RUNTIME_KEY_NAME
        key = _read_key(path)
        if key is not None:
            return key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(_KEY_HEX // 2) + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        key = _read_key(path)
        if key is None:
            raise StateError(f"unusable runtime key file {path}: it must be a 0600 file of yours holding "
                             f"{_KEY_HEX} hex digits")
        return key


def _read_key(path: Path) -> str | None:
    try:
        st = path.lstat()
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    if len(text) != _KEY_HEX or any(c not in "0123456789abcdef" for c in text):
        return None
    return text


def _claim_private_dir(path: Path) -> str | None:
    """Create ``path`` 0700 if missing; None when it is then a private directory of ours, else why not."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        return f"cannot create it: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}"
    if st.st_mode & 0o077:
        return f"its mode is {stat.S_IMODE(st.st_mode):o}, not 700"
    return None


def _require_private(path: Path) -> Path:
    problem = _claim_private_dir(path)
    if problem is not None:
        raise StateError(f"unsafe runtime directory {path} ({problem}): it must be a directory owned by you "
                         "with mode 0700")
    return path
