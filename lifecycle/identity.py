"""Process identity: a pid plus its create time, re-verified before every signal.

A bare pid is not an identity: after a crash the number is recycled, and signalling it kills a
stranger. Every signal here goes through :func:`signal_verified`, which checks the create time
recorded at spawn immediately before sending, and on Linux pins the process with a pidfd so the
check and the signal address the same process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

import psutil

log = logging.getLogger("codex_broker.lifecycle")

CREATE_TIME_TOLERANCE = 0.01  # seconds; psutil derives create_time from clock ticks as a float
_POLL_INTERVAL = 0.02


def process_create_time(pid: int) -> float | None:
    """The create time of a live process, or None if it is gone, a zombie or not inspectable."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_same_process(pid: int, create_time: float) -> bool:
    """True when ``pid`` is alive, not a zombie, and was created at ``create_time``."""
    actual = process_create_time(pid)
    return actual is not None and abs(actual - create_time) <= CREATE_TIME_TOLERANCE


def runs_instance(pid: int, instance_id: str) -> bool:
    """True when ``pid``'s command line carries ``instance_id`` as an argument, as a broker
    spawned for that record does (``--instance-id ID``).

    Pid + create time say which process it is; this says it is the broker the record describes,
    so a record naming some other live process (hand-edited, or copied from elsewhere) can never
    get that process signalled."""
    try:
        return instance_id in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def signal_verified(pid: int, create_time: float, sig: int, *, group: bool = False) -> bool:
    """Send ``sig`` only if ``pid`` is still the process created at ``create_time``.

    With ``group=True`` the whole process group is signalled, but only when the pid leads its
    own group (as a spawned broker does); otherwise just the pid, so we never hit the caller's
    group. Returns True if a signal was sent.
    """
    if pid <= 0:
        return False  # 0 and negatives address groups, never a single verified process
    with _pinned(pid) as pidfd:
        if not is_same_process(pid, create_time):
            log.info("not signalling pid %d: it is not the process created at %.2f", pid, create_time)
            return False
        try:
            _send(pid, pidfd, sig, group=group)
        except ProcessLookupError:
            return False
        except PermissionError as exc:
            log.warning("not allowed to signal pid %d: %s", pid, exc)
            return False
    return True


def _send(pid: int, pidfd: int | None, sig: int, *, group: bool) -> None:
    if group and _leads_own_group(pid):
        os.killpg(pid, sig)
    elif pidfd is not None:
        signal.pidfd_send_signal(pidfd, sig)
    else:
        os.kill(pid, sig)


def _leads_own_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


@contextlib.contextmanager
def _pinned(pid: int) -> Iterator[int | None]:
    """A pidfd for ``pid`` where the OS has them (Linux >= 5.3), else None.

    Opened before the identity check, the pidfd refers to exactly the process we verify, so a
    pid recycled between the check and the signal cannot receive it.
    """
    fd: int | None = None
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pid)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def wait_gone(pid: int, create_time: float, timeout: float) -> bool:
    """Wait until the process is gone (or a zombie, or replaced); True if it went in time.

    Our own child is waited for (and reaped) by psutil; anyone else's pid has no exit event we
    can wait on portably, so it is polled.
    """
    deadline = time.monotonic() + max(timeout, 0.0)
    if not is_same_process(pid, create_time):
        return True
    if _is_our_child(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            psutil.Process(pid).wait(timeout=max(deadline - time.monotonic(), 0.0))
        return not is_same_process(pid, create_time)
    while is_same_process(pid, create_time):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(_POLL_INTERVAL, remaining))
    return True


def _is_our_child(pid: int) -> bool:
    try:
        return psutil.Process(pid).ppid() == os.getpid()
    except psutil.Error:
        return False
