"""Process identity: a pid plus its create time, re-verified before every signal.

A bare pid is not an identity: after a crash the number is recycled, and signalling it kills a
stranger. Every signal here goes through :func:`signal_verified`, which checks the create time
recorded at spawn immediately before sending, and on Linux pins the process with a pidfd so the
check and the signal address the same process.

A pid that a broker *reports* (Status) is not an identity either: any server can answer with any
pid. :func:`prove_broker` is the one door for turning an endpoint's answer into an identity that
may be signalled or waited on: the pid is alive, runs as this user, and something the answering
process cannot forge ties it to the endpoint. On a unix socket that is the kernel's peer
credentials of a connection (SO_PEERCRED names the process that listens); on TCP it is the pid's
own command line, an exact serve argv (parsed by ``proxy.contract``) carrying the instance id
that Status reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from lifecycle.errors import IdentityError
from proxy import contract

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


def serve_argv(pid: int) -> contract.ServeArgv | None:
    """``pid``'s command line as a serve argv, or None unless it runs this package's entry point
    with exactly serve's options (``proxy.contract.parse_serve_argv``)."""
    try:
        return contract.parse_serve_argv(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None


def runs_instance(pid: int, instance_id: str) -> bool:
    """True when ``pid`` runs ``serve`` with ``--instance-id instance_id``, as a broker spawned for
    that record does.

    Pid + create time say which process it is; this says it is the broker the record describes,
    so a record naming some other live process (hand-edited, or copied from elsewhere) can never
    get that process signalled."""
    argv = serve_argv(pid)
    return bool(instance_id) and argv is not None and argv.instance_id == instance_id


def is_ours(pid: int) -> bool:
    """True when ``pid`` runs as this user (real uid)."""
    try:
        return psutil.Process(pid).uids().real == os.getuid()
    except psutil.Error:
        return False


def peer_credentials(socket_path: str, timeout: float = 2.0) -> tuple[int, int] | None:
    """(pid, uid) of the process listening on the unix socket ``socket_path``, as the kernel
    records it for a connection (SO_PEERCRED), or None when nothing accepts a connection there
    (or the platform has no SO_PEERCRED). A stopped listener still counts: the kernel completes
    the connection into its backlog."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


@dataclass(frozen=True)
class ProcessIdentity:
    """A process proven to be the one answering an endpoint: safe to signal and to wait on
    (every signal still re-checks the create time, :func:`signal_verified`)."""

    pid: int
    create_time: float


def prove_broker(endpoint: str, pid: int, instance_id: str) -> ProcessIdentity:
    """The identity of the broker that answered ``endpoint``'s Status with ``pid`` and
    ``instance_id``; IdentityError (saying what failed) unless all of it holds:

    - ``pid`` is alive and not a zombie (its create time is read now), and runs as this user;
    - unix endpoint: the kernel's peer credentials of a connection to the socket name ``pid``
      (and this user) as the listener;
    - TCP endpoint: ``pid``'s command line is exactly a serve argv with ``--instance-id
      instance_id`` (so every broker reachable over TCP must be started with --instance-id);
    - ``pid`` still has the same create time once all of that was checked."""
    create_time = process_create_time(pid)
    if create_time is None:
        raise IdentityError(f"pid {pid} named by {endpoint} is not a running process here")
    if not is_ours(pid):
        raise IdentityError(f"pid {pid} named by {endpoint} does not run as this user")
    if contract.is_tcp(endpoint):
        _prove_tcp(endpoint, pid, instance_id)
    else:
        _prove_unix(endpoint, pid)
    if not is_same_process(pid, create_time):
        raise IdentityError(f"pid {pid} named by {endpoint} exited while its identity was checked")
    return ProcessIdentity(pid, create_time)


def prove_recorded_broker(pid: int, create_time: float, instance_id: str, socket_path: str) -> ProcessIdentity:
    """The identity of a broker known by what it was started as (a record, or its own command
    line found by a process scan), whether or not it still answers; IdentityError unless:

    - ``pid`` is alive, not a zombie, created at ``create_time``, and runs as this user;
    - its own command line is exactly a serve argv carrying ``--instance-id instance_id``;
    - if anything accepts connections on ``socket_path``, the kernel names ``pid`` as the
      listener (a broker whose socket was deleted, or that never bound it, has no listener)."""
    if not is_same_process(pid, create_time):
        raise IdentityError(f"pid {pid} is not the process created at {create_time:.2f}")
    if not is_ours(pid):
        raise IdentityError(f"pid {pid} does not run as this user")
    if not runs_instance(pid, instance_id):
        raise IdentityError(f"pid {pid} is not a codex-broker serve process with --instance-id {instance_id}")
    peer = peer_credentials(socket_path)
    if peer is not None and peer != (pid, os.getuid()):
        raise IdentityError(f"pid {peer[0]} (uid {peer[1]}), not pid {pid}, listens on {socket_path}")
    return ProcessIdentity(pid, create_time)


def _prove_unix(endpoint: str, pid: int) -> None:
    try:
        path = contract.parse_unix_endpoint(endpoint)
    except contract.EndpointError as exc:
        raise IdentityError(str(exc)) from None
    peer = peer_credentials(path)
    if peer is None:
        raise IdentityError(f"cannot prove which process answers {endpoint}: no connection to {path} "
                            "gave the listener's credentials")
    peer_pid, peer_uid = peer
    if peer_pid != pid:
        raise IdentityError(f"{endpoint} answered with pid {pid}, but the process listening there is pid {peer_pid}")
    if peer_uid != os.getuid():
        raise IdentityError(f"the process listening on {endpoint} runs as uid {peer_uid}, not as this user")


def _prove_tcp(endpoint: str, pid: int, instance_id: str) -> None:
    argv = serve_argv(pid)
    if argv is None:
        raise IdentityError(f"pid {pid} named by {endpoint} is not a codex-broker serve process")
    if not instance_id or argv.instance_id != instance_id:
        raise IdentityError(f"pid {pid} named by {endpoint} was not started with --instance-id {instance_id} "
                            "(the instance id Status reported), so it cannot be proven to be the broker answering "
                            "there; start brokers reachable over TCP with --instance-id")


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
