"""Spawning the app-server: its own session (so its whole process group can be stopped),
pipes on its stdio, and death with the broker (Linux PR_SET_PDEATHSIG, even if the broker is
SIGKILLed), under the scheduling policy the broker was started with (see ``proxy.scheduling``).
And making `serve` a child subreaper (Linux PR_SET_CHILD_SUBREAPER), so the
app-server's descendants that leave its process group (setsid) are reparented to the broker
when their parent dies, and the broker can stop them (see ``proxy.reaper``). A SIGKILLed
broker cannot: such a descendant then outlives it (only the app-server has the death signal).

Kept free of asyncio and grpc: `serve` spawns the app-server first thing, and the broker's
heavier imports load while the app-server starts."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Sequence

from proxy import scheduling
from proxy.config import ConfigError
from proxy.sdnotify import child_environment

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: back under the scheduling policy the broker was
    started with (proxy.scheduling); die with the broker (Linux), even by SIGKILL."""
    prctl = getattr(_libc, "prctl", None)
    policy = scheduling.child_policy()

    def setup() -> None:
        scheduling.restore_in_child(policy)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the broker died before prctl took effect
                os._exit(1)

    return setup


def become_subreaper() -> bool:
    """Makes this process a child subreaper (Linux >= 3.4); False where that is not possible.
    Only for a process that reaps its children by pid (`serve`), never for one that merely
    embeds the broker."""
    prctl = getattr(_libc, "prctl", None)
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def is_subreaper() -> bool:
    prctl = getattr(_libc, "prctl", None)
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    return prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0


def spawn(argv: Sequence[str], *, cwd: str | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The running child, its stdin, stdout and stderr piped (unbuffered), its environment
    ``env`` (default: ours) without systemd's notify variables. ConfigError naming the cause
    when the command cannot run."""
    env = child_environment(os.environ if env is None else env)
    try:
        return subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0, start_new_session=True,
                                preexec_fn=_child_setup(os.getpid()))
    except FileNotFoundError as exc:
        if cwd is not None and exc.filename == cwd:
            raise ConfigError(f"--cwd does not exist: {cwd}") from None
        raise ConfigError(f"app-server command not found: {argv[0]}") from None
    except PermissionError:
        raise ConfigError(f"app-server command is not executable: {argv[0]}") from None
    except NotADirectoryError:
        raise ConfigError(f"--cwd is not a directory: {cwd}") from None


def kill(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group and reap the child (for a child nobody else
    will stop: the broker failed before taking it over)."""
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.wait()
    for pipe in (child.stdin, child.stdout, child.stderr):
        if pipe is not None:
            pipe.close()
