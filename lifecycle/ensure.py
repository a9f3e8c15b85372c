"""``ensure_broker``: exactly one healthy broker per workspace, decided by a real round trip.

Under the workspace's exclusive lock: read the record, observe (identity by pid + create time,
Status for the instance id and state, Health for the round trip), decide with the pure table
of ``lifecycle.decide``, then act. Nothing is signalled without identity, and an aged broker is
never stopped: it is asked to drain, and the new broker is spawned at once."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lifecycle import identity
from lifecycle.client import BrokerClient
from lifecycle.decide import Decision, Observation, Verdict, decide, max_age_seconds, resolve_codex_home
from lifecycle.errors import BrokerError, ConnectError, HealthTimeout, UsageError
from lifecycle.spawn import app_server_command, spawn_broker
from lifecycle.state import BrokerRecord, HistoryEntry, WorkspaceState, state_root

log = logging.getLogger("codex_broker.lifecycle")

PROBE_TIMEOUT = 2.0  # Status and Health of the recorded broker, each
EXIT_WAIT = 5.0  # how long a force-drained broker gets to exit before it is killed
LOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class BrokerSession:
    """The workspace's broker, ready to serve."""

    endpoint: str
    pid: int
    instance_id: str
    started_at: float
    cwd: str
    log_file: str
    reused: bool
    verdict: str  # what ensure found: live, none, dead, aged, ...
    reason: str

    def client(self) -> BrokerClient:
        return BrokerClient(self.endpoint)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _session(record: BrokerRecord, decision: Decision) -> BrokerSession:
    return BrokerSession(endpoint=record.endpoint, pid=record.pid, instance_id=record.instance_id,
                         started_at=record.started_at, cwd=record.cwd, log_file=record.log_file,
                         reused=decision.reuse, verdict=decision.verdict.name.lower(), reason=decision.reason)


def observe(record: BrokerRecord | None, *, env: Mapping[str, str], wanted_command: list[str],
            timeout: float = PROBE_TIMEOUT) -> Observation:
    """Everything the decision needs, gathered with bounded waits; never signals."""
    now = time.time()
    wanted_home = resolve_codex_home(env)
    base = dict(now=now, max_age_seconds=max_age_seconds(env), wanted_app_server_command=tuple(wanted_command),
                wanted_codex_home=wanted_home)
    if record is None:
        return Observation(record_present=False, record_corrupt=False, pid_alive=False, create_time_matches=False,
                           status_answered=False, status_instance_id=None, record_instance_id=None,
                           broker_state=None, health=None, started_at=0.0, record_app_server_command=(),
                           record_codex_home="", **base)  # type: ignore[arg-type]
    alive = identity.process_create_time(record.pid) is not None
    same = (alive and identity.is_same_process(record.pid, record.create_time)
            and identity.runs_instance(record.pid, record.instance_id))
    answered, instance, state, health = False, None, None, None
    if same:
        with BrokerClient(record.endpoint) as client:
            try:
                status = client.status(timeout=timeout)
                answered, instance = True, status.instance_id
                state = _state_name(status.state)
            except BrokerError:
                pass
            if instance in (None, record.instance_id):
                try:
                    health = client.health(timeout=timeout)
                    if health not in ("SERVING", "NOT_SERVING"):
                        health = "NOT_SERVING"
                except (ConnectError, HealthTimeout):
                    health = None
    return Observation(record_present=True, record_corrupt=False, pid_alive=alive, create_time_matches=same,
                       status_answered=answered, status_instance_id=instance,
                       record_instance_id=record.instance_id, broker_state=state, health=health,
                       started_at=record.started_at, record_app_server_command=tuple(record.app_server_command),
                       record_codex_home=record.codex_home, **base)  # type: ignore[arg-type]


def _state_name(state: int) -> str:
    from protos import broker_pb2

    return broker_pb2.BrokerState.Name(state).removeprefix("BROKER_STATE_")


def ensure_broker(cwd: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                  state_dir: Path | None = None, spawn_timeout: float = 30.0,
                  progress: Callable[[str], None] | None = None) -> BrokerSession:
    """The workspace's healthy broker: reused when live, otherwise spawned (rotating the old one
    gracefully when it is aged or mismatched). Raises a BrokerError subclass naming the phase."""
    return _ensure(cwd, env=env, state_dir=state_dir, spawn_timeout=spawn_timeout, progress=progress)


def rotate_broker(cwd: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                  state_dir: Path | None = None, spawn_timeout: float = 30.0,
                  progress: Callable[[str], None] | None = None) -> BrokerSession:
    """Like ensure_broker, but a live broker is rotated too: asked to drain (its turns finish)
    while a new one is spawned for every later caller."""
    return _ensure(cwd, env=env, state_dir=state_dir, spawn_timeout=spawn_timeout, progress=progress,
                   rotate=True)


def workspace_state(cwd: str | os.PathLike[str] | None, env: Mapping[str, str],
                    state_dir: Path | None = None) -> tuple[str, WorkspaceState]:
    workspace = os.path.realpath(cwd if cwd is not None else os.getcwd())
    if not os.path.isdir(workspace):
        raise UsageError(f"not a directory: {workspace}")
    root = state_dir if state_dir is not None else state_root(env)
    return workspace, WorkspaceState.for_cwd(workspace, root)


def _ensure(cwd: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None, state_dir: Path | None,
            spawn_timeout: float, progress: Callable[[str], None] | None, rotate: bool = False) -> BrokerSession:
    env = os.environ if env is None else env
    workspace, state = workspace_state(cwd, env, state_dir)
    command = app_server_command(env)
    with state.lock(timeout=LOCK_TIMEOUT):
        record = state.read()
        observation = observe(record, env=env, wanted_command=command)
        if state.corrupt is not None:
            observation = dataclasses.replace(observation, record_corrupt=True)
        decision = decide(observation)
        if decision.reuse and rotate:
            decision = Decision(Verdict.AGED, spawn=True, drain=True, signal_allowed=True,
                                reason="rotate: requested")
        if decision.reuse:
            assert record is not None
            return _session(record, decision)
        log.info("%s", decision.reason)
        if record is not None:
            _act_on_old(state, record, decision)
        new = spawn_broker(workspace, command=command, env=env, state=state, timeout=spawn_timeout,
                           progress=progress)
        state.write(new)
        if record is not None or state.corrupt is not None:
            reason = decision.reason if record is not None else f"{decision.reason} ({state.corrupt})"
            state.append_history(HistoryEntry(
                at=time.time(), reason=reason,
                old_instance=record.instance_id if record else None, new_instance=new.instance_id,
                old_pid=record.pid if record else None, new_pid=new.pid))
        return _session(new, decision)


def _act_on_old(state: WorkspaceState, record: BrokerRecord, decision: Decision) -> None:
    if decision.drain:
        _drain(record, force=False, reason=decision.reason)
    elif decision.force_drain:
        if not _drain(record, force=True, reason=decision.reason) or \
                not identity.wait_gone(record.pid, record.create_time, EXIT_WAIT):
            log.warning("broker pid %d did not exit after a forced drain: killing it", record.pid)
            kill_broker(record)
    elif decision.kill:
        # A broker whose app-server just died removes its socket a few ms before it exits:
        # give it a moment, so a crash is not recorded (and handled) as a wedge.
        if identity.wait_gone(record.pid, record.create_time, 0.5):
            log.info("broker pid %d exited by itself", record.pid)
        else:
            kill_broker(record)
    if decision.clean_files or decision.kill or decision.verdict is Verdict.UNHEALTHY:
        remove_session_dir(record)


def _drain(record: BrokerRecord, *, force: bool, reason: str) -> bool:
    try:
        with BrokerClient(record.endpoint) as client:
            client.drain(0.0, reason=reason, force=force, timeout=PROBE_TIMEOUT)
        return True
    except BrokerError as exc:
        log.warning("could not ask broker pid %d to drain: %s", record.pid, exc)
        return False


def kill_broker(record: BrokerRecord) -> None:
    """SIGKILL the broker's process group and the app-server's, each identity-verified first."""
    # The app-server's group first: the broker's death takes the direct child with it (parent-death
    # signal), after which its identity no longer verifies, but a native server behind a launcher
    # in that group would survive, stopped forever if it was wedged.
    if not identity.runs_instance(record.pid, record.instance_id):
        log.warning("not killing pid %d: it is not the broker %s", record.pid, record.instance_id)
        return
    if record.app_server_pid and record.app_server_create_time:
        identity.signal_verified(record.app_server_pid, record.app_server_create_time, signal.SIGKILL, group=True)
    killed = identity.signal_verified(record.pid, record.create_time, signal.SIGKILL, group=True)
    if record.app_server_pid and record.app_server_create_time:
        identity.wait_gone(record.app_server_pid, record.app_server_create_time, EXIT_WAIT)
    if killed:
        identity.wait_gone(record.pid, record.create_time, EXIT_WAIT)


def remove_session_dir(record: BrokerRecord) -> None:
    """Removes a dead broker's socket directory: only the files a broker puts there, then the
    directory if that leaves it empty (a tampered record can never make this delete more)."""
    path = Path(record.session_dir)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if st.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        return
    for name in ("s.sock", "broker.pid"):
        try:
            (path / name).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return
    try:
        path.rmdir()
    except OSError:
        pass
