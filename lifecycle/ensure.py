"""``ensure_broker``: exactly one healthy broker per workspace, decided by a real round trip.

Under the workspace's exclusive lock: read the record, observe (identity by pid + create time,
Status for the instance id and state, Health for the round trip), decide with the pure table
of ``lifecycle.decide``, then act. Nothing is signalled without identity, and an aged broker is
never stopped: it is asked to drain, and the new broker is spawned at once.

Observing is fast when the broker answers (one Status, one Health). Only silence costs time:
a broker counts as wedged after no answer across several attempts over the wedge window (the
hang threshold plus a margin), and an answer that comes late within it counts as alive, so a
busy broker (stopped in bursts, or slow under load) is never killed."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle import identity
from lifecycle.client import BrokerClient, state_name
from lifecycle.decide import (
    DEFAULT_SPAWN_DEADLINE,
    WEDGE_WINDOW,
    Decision,
    Observation,
    Verdict,
    decide,
    max_age_seconds,
    resolve_codex_home,
)
from lifecycle.errors import BrokerError, CallTimeout, ConnectError, HealthTimeout, RpcFailed, UsageError
from lifecycle.settings import Settings
from lifecycle.spawn import app_server_command, finish_record, spawn_broker, wait_serving
from lifecycle.state import BrokerRecord, HistoryEntry, WorkspaceState, state_root
from proxy import contract

log = logging.getLogger("codex_broker.lifecycle")

ATTEMPT_TIMEOUT = 1.5  # one Status or Health attempt; silence is judged over WEDGE_WINDOW
RETRY_PAUSE = 0.25  # after an attempt that failed at once (nothing listening yet, refused)
HEALTH_BUDGET = WEDGE_WINDOW  # Health's own time once Status has answered, even late in the window
EXIT_WAIT = 5.0  # how long a killed broker gets to be gone
DRAIN_TIMEOUT = 5.0  # the Drain RPC to an old broker
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
    jsonl_endpoint: str = ""  # the broker's JSONL front end; "" for one recorded without it

    def client(self) -> BrokerClient:
        return BrokerClient(self.endpoint)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _session(record: BrokerRecord, decision: Decision) -> BrokerSession:
    return BrokerSession(endpoint=record.endpoint, pid=record.pid, instance_id=record.instance_id,
                         started_at=record.started_at, cwd=record.cwd, log_file=record.log_file,
                         reused=decision.reuse, verdict=decision.verdict.name.lower(), reason=decision.reason,
                         jsonl_endpoint=record.jsonl_endpoint)


@dataclass(frozen=True)
class Probe:
    """What the recorded broker answered, and how long it was tried when it answered nothing."""

    status: object | None = None  # a BrokerStatus when Status answered
    health: str | None = None
    silent_seconds: float = 0.0
    attempts: int = 0


def probe_broker(client: BrokerClient, instance_id: str, *, window: float = WEDGE_WINDOW,
                 progress: Callable[[str], None] | None = None, gone: Callable[[], bool] | None = None) -> Probe:
    """Status, then Health, retried across ``window`` while nothing answers. An answer of any
    kind is life: a Status error other than UNAVAILABLE or a timeout, or a Health that does not
    answer once Status has, reads as NOT_SERVING (unhealthy, never wedged). ``gone``: whether
    the broker's process has exited; asked after each refused connect, it ends the probe early
    (a broker stopping by itself removes its socket a moment before it exits)."""
    start = time.monotonic()
    deadline = start + window
    status, responded, attempts = None, False, 0
    while status is None and not responded and time.monotonic() < deadline:
        if progress is not None and attempts and time.monotonic() - start >= 1.0:
            progress(f"the broker has not answered for {time.monotonic() - start:.0f} s "
                     f"(wedged after {window:g} s of silence)")
        attempts += 1
        try:
            status = client.status(timeout=min(ATTEMPT_TIMEOUT, deadline - time.monotonic()))
        except RpcFailed:
            responded = True
        except ConnectError:
            if gone is not None and gone():
                break
            time.sleep(max(0.0, min(RETRY_PAUSE, deadline - time.monotonic())))
        except CallTimeout:
            pass
    if status is None and not responded:
        return Probe(silent_seconds=time.monotonic() - start, attempts=attempts)
    if status is not None and status.instance_id != instance_id:
        return Probe(status=status)  # foreign: its Health says nothing about ours
    health_deadline = max(deadline, time.monotonic() + HEALTH_BUDGET)
    return Probe(status=status, health=_health(client, health_deadline), attempts=attempts)


def _health(client: BrokerClient, deadline: float) -> str:
    """Health until ``deadline``; anything but SERVING is NOT_SERVING (the broker answered Status)."""
    while time.monotonic() < deadline:
        try:
            answer = client.health(timeout=min(ATTEMPT_TIMEOUT, deadline - time.monotonic()))
            return answer if answer == "SERVING" else "NOT_SERVING"
        except RpcFailed:
            return "NOT_SERVING"
        except ConnectError:
            time.sleep(max(0.0, min(RETRY_PAUSE, deadline - time.monotonic())))
        except HealthTimeout:
            pass
    return "NOT_SERVING"


def observe(record: BrokerRecord | None, *, env: Mapping[str, str], wanted_command: list[str],
            spawn_deadline: float = DEFAULT_SPAWN_DEADLINE, window: float = WEDGE_WINDOW,
            progress: Callable[[str], None] | None = None) -> Observation:
    """Everything the decision needs, gathered with bounded waits; never signals."""
    wanted_home = resolve_codex_home(env)
    base = dict(max_age_seconds=max_age_seconds(env), wanted_app_server_command=tuple(wanted_command),
                wanted_codex_home=wanted_home, spawn_deadline_seconds=spawn_deadline, wedge_window_seconds=window)
    if record is None:
        return Observation(record_present=False, record_corrupt=False, pid_alive=False, create_time_matches=False,
                           status_answered=False, status_instance_id=None, record_instance_id=None,
                           broker_state=None, health=None, started_at=0.0, now=time.time(),
                           record_app_server_command=(), record_codex_home="", **base)  # type: ignore[arg-type]
    alive = identity.process_create_time(record.pid) is not None
    same = (alive and identity.is_same_process(record.pid, record.create_time)
            and identity.runs_instance(record.pid, record.instance_id))
    probe = Probe()
    if same:
        def gone() -> bool:
            return not identity.is_same_process(record.pid, record.create_time)

        with BrokerClient(record.endpoint) as client:
            probe = probe_broker(client, record.instance_id, window=_window(record, spawn_deadline, window),
                                 progress=progress, gone=gone)
        if probe.status is None and gone():  # it exited while it was tried: dead, not wedged
            alive = identity.process_create_time(record.pid) is not None
            same = False
    status: Any = probe.status
    return Observation(record_present=True, record_corrupt=False, pid_alive=alive, create_time_matches=same,
                       status_answered=status is not None,
                       status_instance_id=status.instance_id if status is not None else None,
                       record_instance_id=record.instance_id,
                       broker_state=state_name(status.state) if status is not None else None,
                       health=probe.health, started_at=record.started_at, now=time.time(),
                       record_app_server_command=tuple(record.app_server_command),
                       record_codex_home=record.codex_home, record_starting=record.starting,
                       silent_seconds=probe.silent_seconds, probe_attempts=probe.attempts,
                       broker_max_age_seconds=broker_max_age(status, record), **base)  # type: ignore[arg-type]


def broker_max_age(status: Any, record: BrokerRecord) -> float | None:
    """The max age the broker itself applies, in seconds: from its Status, else from its record
    (spawn wrote what it passed); None for a broker that says neither (judged by the caller's)."""
    if status is not None and status.HasField("max_age_hours"):
        return float(status.max_age_hours) * 3600.0
    return record.max_age_seconds


def _window(record: BrokerRecord, spawn_deadline: float, window: float) -> float:
    """A record still starting within its spawn deadline is waited for with a Health Watch
    (the STARTING row), so one short attempt is enough to see whether it is SERVING already."""
    if record.starting and time.time() - record.started_at < spawn_deadline:
        return min(window, ATTEMPT_TIMEOUT)
    return window


def ensure_broker(cwd: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                  state_dir: Path | None = None, spawn_timeout: float | None = None,
                  progress: Callable[[str], None] | None = None) -> BrokerSession:
    """The workspace's healthy broker: reused when live, otherwise spawned (rotating the old one
    gracefully when it is aged or mismatched). Raises a BrokerError subclass naming the phase."""
    return _ensure(cwd, env=env, state_dir=state_dir, spawn_timeout=spawn_timeout, progress=progress)


def rotate_broker(cwd: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                  state_dir: Path | None = None, spawn_timeout: float | None = None,
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
            spawn_timeout: float | None, progress: Callable[[str], None] | None, rotate: bool = False
            ) -> BrokerSession:
    env = os.environ if env is None else env
    if spawn_timeout is None:  # also the deadline of a record still starting, and gc's "may be starting"
        spawn_timeout = Settings.from_env(env).spawn_timeout
    workspace, state = workspace_state(cwd, env, state_dir)
    command = app_server_command(env)
    with state.lock(timeout=LOCK_TIMEOUT):
        record = state.read()
        decision = _judge(state, record, env=env, command=command, spawn_timeout=spawn_timeout, progress=progress)
        if decision.reuse and rotate:
            decision = Decision(Verdict.AGED, spawn=True, drain=True, signal_allowed=True,
                                reason="rotate: requested")
        if decision.reuse:
            assert record is not None
            return _session(_adopt(state, record), decision)
        log.info("%s", decision.reason)
        if record is not None:
            _act_on_old(record, decision)
        new = spawn_broker(workspace, command=command, env=env, state=state, timeout=spawn_timeout,
                           progress=progress)
        if record is not None or state.corrupt is not None:
            reason = decision.reason if record is not None else f"{decision.reason} ({state.corrupt})"
            state.append_history(HistoryEntry(
                at=time.time(), reason=reason,
                old_instance=record.instance_id if record else None, new_instance=new.instance_id,
                old_pid=record.pid if record else None, new_pid=new.pid))
        return _session(new, decision)


def _judge(state: WorkspaceState, record: BrokerRecord | None, *, env: Mapping[str, str], command: list[str],
           spawn_timeout: float, progress: Callable[[str], None] | None) -> Decision:
    """Observe and decide; a broker still starting (its spawner was killed) is waited for, as its
    spawn would have, and then judged again. Ends: each wait lasts until SERVING, the broker's
    exit or the spawn deadline, after which the table no longer says STARTING (and should the
    wall clock have stepped back, a full deadline waited here counts as the deadline passed)."""
    began = time.monotonic()
    while True:
        observation = observe(record, env=env, wanted_command=command, spawn_deadline=spawn_timeout,
                              progress=progress)
        if state.corrupt is not None:
            observation = dataclasses.replace(observation, record_corrupt=True)
        if time.monotonic() - began >= spawn_timeout:
            observation = dataclasses.replace(observation, now=max(observation.now, observation.started_at
                                                                   + observation.spawn_deadline_seconds))
        decision = decide(observation)
        if decision.verdict is not Verdict.STARTING or record is None:
            return decision
        log.info("%s", decision.reason)
        _wait_ready(record, decision.wait_ready, progress)


def _wait_ready(record: BrokerRecord, timeout: float, progress: Callable[[str], None] | None) -> None:
    """Until the recorded broker is SERVING (a Health Watch), exits, or ``timeout`` passes. Not
    our child, so its exit is polled, and only while the Watch lasts."""
    watching = threading.Event()
    watching.set()

    def gone() -> bool:
        while watching.is_set():
            if identity.wait_gone(record.pid, record.create_time, 0.2):
                return True
        return False

    try:
        wait_serving(record.endpoint, timeout, gone, progress)
    finally:
        watching.clear()


def _adopt(state: WorkspaceState, record: BrokerRecord) -> BrokerRecord:
    """The record to hand out for a reused broker: a starting one (its spawner was killed after
    the broker came up) is completed from Status and recorded as ready."""
    if not record.starting:
        return record
    ready = finish_record(record)
    state.write(ready)
    log.info("broker pid %d, recorded as starting by an interrupted spawn, is SERVING: recorded as ready",
             record.pid)
    return ready


def _act_on_old(record: BrokerRecord, decision: Decision) -> None:
    if decision.drain:
        _drain(record, reason=decision.reason)
    elif decision.kill:
        # A broker whose app-server just died removes its socket a few ms before it exits:
        # give it a moment, so a crash is not recorded (and handled) as a wedge.
        if identity.wait_gone(record.pid, record.create_time, 0.5):
            log.info("broker pid %d exited by itself", record.pid)
        else:
            kill_broker(record)
    if decision.clean_files or decision.kill:
        remove_session_dir(record)


def _drain(record: BrokerRecord, *, reason: str) -> bool:
    """Drain without force, with the broker's default deadline: its turns finish, then it exits."""
    try:
        with BrokerClient(record.endpoint) as client:
            client.drain(0.0, reason=reason, force=False, timeout=DRAIN_TIMEOUT)
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
    for name in contract.SESSION_FILES:
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
