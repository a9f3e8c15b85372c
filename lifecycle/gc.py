"""``codex-broker gc``: stop this user's orphaned brokers and remove dead session directories.

Nothing is acted on without proof; each rule below is what a fast path relies on:

- A process is a broker only if it runs as this user, its command line parses exactly as a serve
  argv of this package's entry point (``proxy.contract.parse_serve_argv``), and it listens where
  spawn puts brokers: ``<runtime>/<session name>/s.sock``, the session directory one level inside
  this user's runtime directory (by its normalized path and by its real path). Anything else (a
  hand-started broker, a process that merely mentions ``serve --endpoint ...``) is not gc's.
- A broker belongs to the workspace its ``--cwd`` names, in the state root its ``--state-root``
  names. It is orphaned when that workspace's record does not name its instance id, read while
  holding the workspace's lock: the lock ensure holds while it starts (and records) a broker, so a
  held lock means "still starting" and the broker is left alone, as is any broker younger than the
  spawn deadline. A broker recorded in any phase is never an orphan.
- A SERVING orphan whose Status names its own pid and instance id is asked to drain (its turns
  finish); a draining one is left to exit by itself; one that does not answer is SIGKILLed only
  once ``identity.prove_recorded_broker`` holds (same create time as found, its own exact serve
  argv with its instance id, and, if anything listens on its socket, the kernel's peer
  credentials name it), each signal re-checking the create time.
- A directory is deleted only if it provably is a dead session directory spawn created: named as
  spawn names them, directly inside the runtime directory (real path), ours and not a symlink,
  older than the spawn deadline, holding nothing but what a broker leaves there, with no process
  of ours naming it in its command line, nothing accepting connections on its socket and its pid
  file naming no live process. All of it is checked again right before the deletion, which removes those files
  through a descriptor of the directory and then the directory itself.
- Each problem is one line of the report, and gc goes on with the next broker or directory."""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import psutil

from lifecycle import identity
from lifecycle.client import BrokerClient, state_name
from lifecycle.errors import BrokerError, IdentityError
from lifecycle.settings import Settings
from lifecycle.state import WorkspaceState
from proxy import contract

DRAIN_REASON = "codex-broker gc: orphaned (no workspace records it)"
RPC_TIMEOUT = 2.0
EXIT_WAIT = 5.0


@dataclass(frozen=True)
class ServeProcess:
    """A process of this user whose command line is a serve argv with a unix endpoint."""

    pid: int
    create_time: float
    argv: contract.ServeArgv
    socket_path: str  # normalized

    @property
    def session_dir(self) -> str:
        return os.path.dirname(self.socket_path)


def serve_processes() -> list[ServeProcess]:
    """This user's live serve processes listening on a unix socket."""
    found = []
    uid = os.getuid()
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "create_time", "status"]):
        info = proc.info
        if not info.get("uids") or info["uids"].real != uid or info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        argv = contract.parse_serve_argv(info.get("cmdline") or [])
        if argv is None or contract.is_tcp(argv.endpoint):
            continue
        try:
            sock = contract.parse_unix_endpoint(argv.endpoint)
        except contract.EndpointError:
            continue
        found.append(ServeProcess(info["pid"], info["create_time"], argv, sock))
    return found


def in_spawn_layout(sock: str, runtime: Path) -> bool:
    """True when ``sock`` is ``<runtime>/<session name>/s.sock``, by its text and its real path."""
    session_dir = os.path.dirname(sock)
    if os.path.basename(sock) != contract.SOCKET_NAME:
        return False
    if not contract.is_session_dir_name(os.path.basename(session_dir)):
        return False
    if os.path.dirname(session_dir) != os.path.abspath(runtime):
        return False
    return os.path.dirname(os.path.realpath(session_dir)) == os.path.realpath(runtime)


def collect(env: Mapping[str, str] | None = None, *, dry_run: bool = False,
            settings: Settings | None = None) -> dict[str, Any]:
    """One gc pass; the report: the runtime dir, how many brokers were found there, and one line per
    action taken (or, with ``dry_run``, that would be taken) and per problem met."""
    settings = settings if settings is not None else Settings.from_env(env)
    runtime = settings.runtime_dir()
    settings.spawn_timeout  # noqa: B018 (a bad CODEX_BROKER_SPAWN_TIMEOUT is one UsageError, up front)
    processes = serve_processes()
    brokers = [p for p in processes if in_spawn_layout(p.socket_path, runtime)]
    actions: list[str] = []
    for broker in brokers:
        try:
            line = _judge(broker, settings, dry_run)
        except Exception as exc:  # one line, and on to the next broker
            line = f"problem with broker pid {broker.pid}: {_one_line(exc)}"
        if line:
            actions.append(line)
    for path in _entries(runtime, actions):
        try:
            line = _collect_dir(path, runtime, settings, dry_run)
        except Exception as exc:
            line = f"problem with {path}: {_one_line(exc)}"
        if line:
            actions.append(line)
    return {"runtime_dir": str(runtime), "brokers": len(brokers), "actions": actions}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _entries(runtime: Path, actions: list[str]) -> list[Path]:
    try:
        return sorted(runtime.iterdir())
    except OSError as exc:
        actions.append(f"problem: cannot list {runtime}: {exc.strerror}")
        return []


# -- brokers --------------------------------------------------------------------------------
def _judge(broker: ServeProcess, settings: Settings, dry_run: bool) -> str | None:
    """What gc does about one broker in the runtime dir (None: nothing to say)."""
    argv, pid = broker.argv, broker.pid
    if not (argv.state_root and argv.instance_id and argv.cwd):
        return (f"left broker pid {pid} alone: its command line does not name its state root, instance id "
                "and workspace (not started by this codex-broker)")
    if time.time() - broker.create_time < settings.spawn_timeout:
        return None  # may still be starting
    root = Path(argv.state_root)
    try:
        st = root.lstat()
    except OSError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return f"left broker pid {pid} alone: its state root {root} is missing or not yours"
    state = WorkspaceState.for_cwd(argv.cwd, root)
    try:
        lock = state.lock(timeout=0).acquire()
    except filelock.Timeout:
        return None  # ensure holds the workspace: starting (or replacing) a broker now
    with lock:
        record = state.read()
        if record is not None and record.instance_id == argv.instance_id:
            return None
        if not identity.is_same_process(pid, broker.create_time):
            return None  # exited meanwhile
        return _retire(broker, dry_run)


def _retire(broker: ServeProcess, dry_run: bool) -> str:
    pid, endpoint = broker.pid, broker.argv.endpoint
    try:
        with BrokerClient(endpoint) as client:
            status = client.status(timeout=RPC_TIMEOUT)
            if status.instance_id != broker.argv.instance_id or status.pid != pid:
                return (f"left broker pid {pid} alone: {endpoint} answers for pid {status.pid}, instance "
                        f"{status.instance_id or '(none)'}")
            if state_name(status.state) in contract.WINDING_DOWN:
                return f"left orphaned broker pid {pid} alone: it is draining and will exit by itself"
            if dry_run:
                return f"would drain orphaned broker pid {pid} ({endpoint})"
            client.drain(0.0, reason=DRAIN_REASON, timeout=RPC_TIMEOUT)
            return f"asked orphaned broker pid {pid} to drain ({endpoint})"
    except BrokerError:
        pass  # it does not answer
    try:
        identity.prove_recorded_broker(pid, broker.create_time, broker.argv.instance_id or "", broker.socket_path)
    except IdentityError as exc:
        return f"left unresponsive broker pid {pid} alone: {exc}"
    if dry_run:
        return f"would kill unresponsive orphaned broker pid {pid}"
    return _kill(broker)


def _kill(broker: ServeProcess) -> str:
    """SIGKILL the broker's group and its children's (the app-server's own group: a native server
    behind a launcher would survive otherwise), each by a verified create time."""
    pid = broker.pid
    children = []
    with contextlib.suppress(psutil.Error):
        children = [(c.pid, c.create_time()) for c in psutil.Process(pid).children()]
    for child_pid, child_created in children:
        identity.signal_verified(child_pid, child_created, signal.SIGKILL, group=True)
    if not identity.signal_verified(pid, broker.create_time, signal.SIGKILL, group=True):
        return f"broker pid {pid} was already gone"
    identity.wait_gone(pid, broker.create_time, EXIT_WAIT)
    return f"killed unresponsive orphaned broker pid {pid}"


# -- session directories --------------------------------------------------------------------
def _collect_dir(path: Path, runtime: Path, settings: Settings, dry_run: bool) -> str | None:
    if not contract.is_session_dir_name(path.name):
        return None
    problem = dead_session_dir_problem(path, runtime, settings.spawn_timeout)
    if problem is not None:
        return None if problem in _QUIET else f"left {path} alone: {problem}"
    if dry_run:
        return f"would remove dead session directory {path}"
    problem = dead_session_dir_problem(path, runtime, settings.spawn_timeout)  # again, right before
    if problem is not None:
        return None if problem in _QUIET else f"left {path} alone: {problem}"
    _remove_session_dir(path)
    return f"removed dead session directory {path}"


_IN_USE, _YOUNG = "in use by a live process", "younger than the spawn deadline"
_QUIET = (_IN_USE, _YOUNG)


def dead_session_dir_problem(path: Path, runtime: Path, young: float) -> str | None:
    """None when ``path`` provably is a dead session directory that spawn created, else why not."""
    if not contract.is_session_dir_name(path.name) or path.parent != runtime:
        return "not named as a session directory inside the runtime directory"
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}"
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(runtime):
        return "its real path is not inside the runtime directory"
    if time.time() - st.st_mtime < young:
        return _YOUNG
    extra = sorted(set(os.listdir(path)) - set(contract.SESSION_FILES))
    if extra:
        return f"it holds files a broker does not leave ({', '.join(extra[:3])})"
    if _in_use(path):
        return _IN_USE
    return None


def _in_use(path: Path) -> bool:
    """A serve process listens there, or any process of ours names it in its command line, or
    something accepts connections on its socket, or its pid file names a live process."""
    real = os.path.realpath(path)
    if any(os.path.realpath(p.session_dir) == real for p in serve_processes()):
        return True
    if _named_by_a_process({str(path), real}):
        return True
    sock = path / contract.SOCKET_NAME
    if sock.exists() and identity.peer_credentials(str(sock), timeout=1.0) is not None:
        return True
    from proxy.config import read_pid

    pid = read_pid(str(path / contract.PID_FILE_NAME))
    return pid is not None and identity.process_create_time(pid) is not None


def _named_by_a_process(paths: set[str]) -> bool:
    uid = os.getuid()
    for proc in psutil.process_iter(["uids", "cmdline", "status"]):
        info = proc.info
        if not info.get("uids") or info["uids"].real != uid or info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        for arg in info.get("cmdline") or ():
            if any(arg.endswith(p) or p + "/" in arg for p in paths):
                return True
    return False


def _remove_session_dir(path: Path) -> None:
    """Remove the files a broker leaves, through a descriptor of the directory itself (a swap of
    the directory for a symlink cannot redirect it), then the directory if that emptied it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in contract.SESSION_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)
