"""Spawning a broker: detached in its own session, listening in a fresh 0700 directory with a
short socket path (gRPC, and the JSONL front end beside it under a fixed name), logging to a
file; ready only once Health says SERVING.

Readiness is an event, not a poll: a Health Watch with wait-for-ready connects as soon as the
socket exists and reports SERVING when the broker is; a watcher thread cancels it the moment
the broker process exits, so a broker that fails to start is reported at once with the tail of
its log.

Sequencing: start -> record (marked starting) -> wait -> record (ready). The broker is recorded
before the wait, so an ensure killed mid-spawn leaves a record the next ensure judges (the
decision table's STARTING row), never an unrecorded broker. On any failure the broker is
stopped and its starting record removed, only if the record still names that instance.

The argv comes from ``proxy.contract.build_serve_argv`` (gc and identity parse it back with the
same module); it names the broker's instance id and the state root whose record owns it. Old logs
are pruned, but never one a running broker still writes to (a draining broker may run for an
hour after it was replaced)."""
from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lifecycle.client import BrokerClient
from lifecycle.errors import BrokerError, SpawnError, SpawnTimeout
from lifecycle.settings import Settings
from lifecycle.state import BrokerRecord, WorkspaceState
from proxy import contract
from proxy.contract import CHANNEL_OPTIONS

LOGS_KEPT = 10


def app_server_command(env: Mapping[str, str]) -> list[str]:
    """The app-server command spawned brokers run: the same rule as ``serve`` (proxy.cli)."""
    return Settings.from_env(env).app_server_command


def runtime_dir(env: Mapping[str, str]) -> Path:
    """Where session directories live (``Settings.runtime_dir``): short paths (unix socket paths
    are limited to ~107 bytes), created 0700, private and ours."""
    return Settings.from_env(env).runtime_dir()


def _log_file(state: WorkspaceState, instance_id: str) -> Path:
    logs = state.path / contract.LOGS_DIR_NAME
    logs.mkdir(mode=0o700, exist_ok=True)
    prune_logs(logs)
    return logs / f"broker-{time.strftime('%Y%m%dT%H%M%S')}-{instance_id[:8]}.log"


def prune_logs(logs: Path, keep: int = LOGS_KEPT) -> list[Path]:
    """Delete all but the ``keep`` newest logs, except those a running broker holds open; returns
    what was deleted."""
    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    old = sorted(logs.glob(contract.LOG_GLOB), key=mtime)[:-keep] if keep > 0 else []
    if not old:
        return []
    in_use = logs_in_use()
    removed = []
    for stale in old:
        if os.path.realpath(stale) not in in_use:
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def logs_in_use() -> set[str]:
    """Real paths of the files this user's running brokers (serve argv, ``proxy.contract``) hold
    open: their stdout and stderr are their log."""
    used: set[str] = set()
    uid = os.getuid()
    for proc in psutil.process_iter(["cmdline", "uids"]):
        info = proc.info
        if not info.get("uids") or info["uids"].real != uid:
            continue
        if contract.parse_serve_argv(info.get("cmdline") or []) is None:
            continue
        try:
            used.update(os.path.realpath(f.path) for f in proc.open_files())
        except psutil.Error:
            continue
    return used


def log_tail(path: str | Path, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def spawn_broker(cwd: str, *, command: list[str], env: Mapping[str, str], state: WorkspaceState,
                 timeout: float = 30.0, progress: Callable[[str], None] | None = None) -> BrokerRecord:
    """Starts a broker for ``cwd``, records it as starting, waits until it is SERVING, then
    records it as ready and returns that record.

    Recording before waiting means an ensure killed mid-spawn never leaves an unrecorded broker:
    the next ensure finds the starting record and waits for it or, past the deadline, kills it.
    On failure the broker is stopped and the record removed (only if it still names it)."""
    instance_id = str(uuid.uuid4())
    session_dir = runtime_dir(env) / secrets.token_hex(contract.SESSION_DIR_BYTES)
    endpoint = contract.unix_endpoint(contract.session_socket(str(session_dir)))
    jsonl_endpoint = contract.unix_endpoint(contract.session_jsonl_socket(str(session_dir)))
    log_file = _log_file(state, instance_id)
    max_age = Settings.from_env(env).max_age_seconds  # the caller's setting, passed explicitly
    argv = contract.build_serve_argv(sys.executable, endpoint=endpoint, cwd=cwd, app_server=shlex.join(command),
                                     instance_id=instance_id, pid_file=str(session_dir / contract.PID_FILE_NAME),
                                     state_root=str(state.root), log_file=str(log_file),
                                     max_age_hours=max_age / 3600.0, jsonl_endpoint=jsonl_endpoint)
    spawned_at = time.time()
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    starting: BrokerRecord | None = None
    try:
        starting = BrokerRecord(
            endpoint=endpoint, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(),
            instance_id=instance_id, started_at=spawned_at, session_dir=str(session_dir), log_file=str(log_file),
            version="", app_server_command=list(command), codex_home=contract.resolve_codex_home(env), cwd=cwd,
            starting=True, jsonl_endpoint=jsonl_endpoint, max_age_seconds=max_age)
        state.write(starting)
        outcome = wait_serving(endpoint, timeout, lambda: proc.wait() is not None, progress)
        if outcome != "serving":
            raise _spawn_failure(outcome, proc, timeout, log_file)
        ready = finish_record(starting)
        state.write(ready)
        return ready
    except BaseException as exc:
        _stop_failed(proc)
        if starting is not None:
            state.clear(starting)
        if isinstance(exc, BrokerError):
            raise
        if isinstance(exc, psutil.Error | grpc.RpcError):
            raise SpawnError(str(exc), log_tail(log_file), str(log_file)) from None
        raise


def finish_record(starting: BrokerRecord) -> BrokerRecord:
    """The ready record of a broker that is SERVING: its own start time, version and
    app-server (pid and create time) from Status. BrokerError when Status does not answer."""
    with BrokerClient(starting.endpoint) as client:
        status = client.status(timeout=5.0)
    app_create = None
    if status.app_server_pid:
        try:
            app_create = psutil.Process(status.app_server_pid).create_time()
        except psutil.Error:
            app_create = None
    max_age = status.max_age_hours * 3600.0 if status.HasField("max_age_hours") else starting.max_age_seconds
    return dataclasses.replace(starting, started_at=status.started_at, version=status.version,
                               app_server_pid=status.app_server_pid or None, app_server_create_time=app_create,
                               starting=False, max_age_seconds=max_age)


def _spawn_failure(outcome: str, proc: subprocess.Popen[bytes], timeout: float, log_file: Path) -> SpawnError:
    if outcome == "gone" or proc.poll() is not None:
        return SpawnError(_exit_cause(proc, log_file), log_tail(log_file), str(log_file))
    if outcome == "timeout":
        return SpawnTimeout(f"broker was not SERVING within {timeout:g} s", log_tail(log_file), str(log_file))
    return SpawnError(f"broker health watch failed: {outcome}", log_tail(log_file), str(log_file))


def wait_serving(endpoint: str, timeout: float, wait_gone: Callable[[], bool],
                 progress: Callable[[str], None] | None = None) -> str:
    """Follows a Health Watch (wait-for-ready: it connects as soon as the socket exists) until
    the broker reports SERVING. ``wait_gone`` blocks until the broker process has exited (True)
    or gives up (False); run on a thread, it cancels the Watch at the exit, so a broker that
    dies is reported at once. Returns "serving", "gone", "timeout", or the Watch's error."""
    channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True)
    exited = threading.Event()

    def watch_process() -> None:
        if wait_gone():
            exited.set()
            call.cancel()

    threading.Thread(target=watch_process, name="spawn-watch", daemon=True).start()
    ticker = _progress_ticker(progress, call) if progress else None
    try:
        for reply in call:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return "serving"
    except grpc.RpcError as exc:
        if exited.is_set():
            return "gone"
        call = exc if isinstance(exc, grpc.Call) else None  # what grpc raises is both
        if call is not None and call.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout"
        return str(call.details() if call is not None else exc)
    finally:
        if ticker is not None:
            ticker.set()
        channel.close()
    return "gone"  # the Watch ended without SERVING: the broker stopped


def _progress_ticker(progress: Callable[[str], None], call: object) -> threading.Event:
    """Reports the wait every second after the first (a terminal user sees it is not stuck)."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(1.0):
            progress(f"waiting for the broker to be SERVING ({time.monotonic() - start:.0f} s)")

    threading.Thread(target=tick, name="spawn-progress", daemon=True).start()
    return done


def _exit_cause(proc: subprocess.Popen[bytes], log_file: Path) -> str:
    code = proc.poll()
    last = log_tail(log_file, 1)
    detail = last.split("codex-broker serve: ", 1)[-1] if "codex-broker serve: " in last else ""
    if code is None:
        return "broker stopped serving before it was ready"
    return f"broker exited with status {code} before it was ready" + (f": {detail}" if detail else "")


def _stop_failed(proc: subprocess.Popen[bytes]) -> None:
    """Our own child, never recorded: stop its whole group and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
