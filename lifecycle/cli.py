"""The ``codex-broker`` command.

Exit codes (one table for every command):
  0  success (health: SERVING)
  1  an error, named on one line (call: the app-server answered with a JSON-RPC error)
  2  bad input, or the broker cannot be reached (health: cannot connect)
  3  an RPC failed or timed out (health: the Check failed)
  4  health: the broker answered NOT_SERVING
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_RPC, EXIT_NOT_SERVING = 0, 1, 2, 3, 4
FORCED_STOP_MARGIN = 3.0  # seconds `stop --force` waits beyond the broker's own forced stop before SIGKILL


def _progress() -> Callable[[str], None] | None:
    """Progress lines for long waits, on a terminal only."""
    if not sys.stderr.isatty():
        return None

    def show(text: str) -> None:
        sys.stderr.write(f"\r\033[Kcodex-broker: {text}")
        sys.stderr.flush()

    return show


def _end_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _age(seconds: float) -> str:
    """A duration for people; total over every float a Status can carry (inf, NaN, huge,
    negative): what cannot be a duration reads "?", a negative one "0s"."""
    if not math.isfinite(seconds):
        return "?"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _since(now: float, then: float) -> str:
    """How long ago ``then`` was; "?" when the difference is not a number."""
    return _age(now - then) if math.isfinite(then) else "?"


def _number(value: float, spec: str = ".2f") -> str:
    return format(value, spec) if math.isfinite(value) else str(value)


def _state_name(value: int) -> str:
    from lifecycle.client import state_name

    return state_name(value)


# -- finding a broker ----------------------------------------------------------------------
def _recorded(args: argparse.Namespace) -> Any:
    from lifecycle.ensure import workspace_state
    from lifecycle.errors import ConnectError

    workspace, state = workspace_state(args.cwd, os.environ)
    record = state.read()
    if record is None:
        raise ConnectError(f"no broker is recorded for {workspace} (run: codex-broker ensure)")
    return record


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token for a TCP endpoint, from --token-file."""
    if not getattr(args, "token_file", None):
        return None
    from lifecycle.errors import UsageError
    from proxy.config import TokenError, read_token_file

    try:
        return read_token_file(args.token_file)
    except TokenError as exc:
        raise UsageError(str(exc)) from None


def _endpoint(args: argparse.Namespace) -> str:
    if getattr(args, "endpoint", None):
        return str(args.endpoint)
    return str(_recorded(args).endpoint)


# -- commands ------------------------------------------------------------------------------
def cmd_ensure(args: argparse.Namespace) -> int:
    from lifecycle.ensure import ensure_broker

    session = ensure_broker(args.cwd, progress=_progress())
    _end_progress()
    if args.json:
        _print_json(session.to_json())
    else:
        how = "reused" if session.reused else f"started ({session.reason})"
        print(f"{session.endpoint} pid {session.pid} {how}")
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    from lifecycle.ensure import rotate_broker

    session = rotate_broker(args.cwd, progress=_progress())
    _end_progress()
    if args.json:
        _print_json(session.to_json())
    else:
        print(f"{session.endpoint} pid {session.pid} started ({session.reason})")
    return EXIT_OK


def status_dict(status: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def format_status(status: Any, now: float | None = None) -> str:
    """The human form of a BrokerStatus. Total: any Status the broker can send (every float
    inf, NaN, huge or negative; strings empty; repeated fields empty; unknown enum values)
    prints, so ``status`` never crashes on what it was told."""
    now = time.time() if now is None else now
    rows = [
        ("state", f"{_state_name(status.state)} (health {status.health or '?'})"),
        ("endpoint", status.endpoint or "?"),
        ("pid", f"{status.pid}, up {_since(now, status.started_at)}, version {status.version or '?'}"),
        ("instance", status.instance_id or "?"),
        ("cwd", status.cwd or "?"),
        ("app-server", f"pid {status.app_server_pid} ({'alive' if status.app_server_alive else 'gone'}): "
                       f"{' '.join(status.app_server_command) or '?'}"),
        ("last probe", f"{_number(status.last_probe_latency_ms)} ms, {_since(now, status.last_probe_at)} ago"
         if status.last_probe_at else "none needed yet"),
        ("last response", f"{_since(now, status.last_response_at)} ago" if status.last_response_at else "none yet"),
        ("sessions", str(status.open_sessions)),
        ("in-flight turns", str(len(status.in_flight_turns))),
        ("pending requests", str(status.pending_requests)),
        ("max age", _max_age(status, now)),
        ("exit if wedged", _exit_when_wedged(status)),
    ]
    if status.drain_deadline:
        rows.append(("drain", f"{status.drain_reason or '-'}; deadline in {_age(status.drain_deadline - now)}"))
    lines = [f"{name:<17}{value}" for name, value in rows]
    for s in status.sessions:
        lines.append(f"  session {s.session_id or '?'} {s.client_name or '-'}: open {_since(now, s.opened_at)}, "
                     f"{s.pending_requests} pending, {s.subscribed_threads} threads, {s.queued_bytes} bytes queued")
    for t in status.in_flight_turns:
        lines.append(f"  turn {t.turn_id or '?'} on thread {t.thread_id or '?'}: running {_since(now, t.started_at)}")
    return "\n".join(lines)


def _max_age(status: Any, now: float) -> str:
    """The broker's own max age, and when it drains itself by it."""
    if not status.HasField("max_age_hours"):
        return "not reported (an older broker)"
    hours = status.max_age_hours
    if not math.isfinite(hours) or hours < 0:
        return _number(hours)
    if hours == 0:
        return "never (no self-drain)"
    return f"{_number(hours, 'g')} h, drains itself in {_age(status.started_at + hours * 3600 - now)}"


def _exit_when_wedged(status: Any) -> str:
    if not status.HasField("exit_when_wedged_seconds"):
        return "not reported (an older broker)"
    seconds = status.exit_when_wedged_seconds
    if not math.isfinite(seconds) or seconds < 0:
        return _number(seconds)
    if seconds == 0:
        return "never"
    return f"after {_number(seconds, 'g')} s wedged (exit 1)"


def cmd_status(args: argparse.Namespace) -> int:
    from lifecycle.client import BrokerClient

    with BrokerClient(_endpoint(args), token=_token(args)) as client:
        status = client.status(timeout=args.timeout)
    if args.json:
        _print_json(status_dict(status))
    else:
        print(format_status(status))
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """grpc_health_probe's contract: 0 serving, 2 cannot connect, 3 RPC failed, 4 not serving."""
    from lifecycle.client import BrokerClient
    from lifecycle.errors import BrokerError, ConnectError

    try:
        endpoint = _endpoint(args)
    except ConnectError as exc:
        print(f"codex-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with BrokerClient(endpoint, token=_token(args)) as client:
        try:
            client.wait_connected(args.connect_timeout)
        except ConnectError as exc:
            print(f"codex-broker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            answer = client.health(args.service, timeout=args.timeout)
        except BrokerError as exc:
            print(f"codex-broker: health check failed: {exc}", file=sys.stderr)
            return EXIT_RPC
    print(f"status: {answer}")
    return EXIT_OK if answer == "SERVING" else EXIT_NOT_SERVING


def _wait_exit(pid: int, create_time: float, timeout: float | None, what: str) -> bool:
    from lifecycle import identity

    progress = _progress()
    start = time.monotonic()
    while True:
        if identity.wait_gone(pid, create_time, 1.0):
            _end_progress()
            return True
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            _end_progress()
            return False
        if progress:
            progress(f"waiting for broker pid {pid} to {what} ({waited:.0f} s)")


def _broker_identity(client: Any, record: Any = None, status: Any = None) -> Any:
    """The proven identity of the broker answering ``client``'s endpoint (``identity.prove_broker``:
    alive, ours, and tied to the endpoint by something Status cannot forge); with a ``record``, its
    instance id must be the one Status reports. IdentityError otherwise: nothing may be signalled
    or waited on."""
    from lifecycle import identity
    from lifecycle.errors import IdentityError

    status = client.status(timeout=5.0) if status is None else status
    if record is not None and status.instance_id != record.instance_id:
        raise IdentityError(f"{client.endpoint} answers for instance {status.instance_id or '(none)'}, "
                            f"not the recorded {record.instance_id}; nothing was signalled")
    try:
        return identity.prove_broker(client.endpoint, status.pid, status.instance_id)
    except IdentityError as exc:
        raise IdentityError(f"refusing to signal or wait on pid {status.pid}: {exc}") from None


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain; with --wait, only a broker whose identity is proven is waited on."""
    from lifecycle.client import BrokerClient
    from lifecycle.errors import DrainTimeout

    record = None if args.endpoint else _recorded(args)
    endpoint = args.endpoint if record is None else record.endpoint
    with BrokerClient(endpoint, token=_token(args)) as client:
        status = client.status(timeout=5.0)
        proven = _broker_identity(client, record, status) if args.wait else None
        reply = client.drain(args.deadline or 0.0, reason=args.reason or "codex-broker drain", force=args.force)
    pid = status.pid
    state = _state_name(reply.state)
    print(f"broker pid {pid}: {state}, {reply.in_flight_turns} turns and {reply.pending_requests} requests in flight")
    if proven is not None:
        if not _wait_exit(proven.pid, proven.create_time, None, "finish its turns and exit"):
            raise DrainTimeout(f"broker pid {pid} did not exit")
        print(f"broker pid {pid} exited")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    """Graceful unless --force: drain with the default deadline and wait for the exit. The broker's
    identity is proven before anything is asked of it; a recorded broker that does not answer is
    stopped (--force) by its record, which ``kill_broker`` verifies again."""
    from lifecycle.client import BrokerClient
    from lifecycle.errors import BrokerError, DrainTimeout

    record = None if args.endpoint else _recorded(args)
    endpoint = args.endpoint if record is None else record.endpoint
    with BrokerClient(endpoint, token=_token(args)) as client:
        try:
            status = client.status(timeout=5.0)
        except BrokerError:
            if record is None or not args.force:
                raise
            proven = _recorded_identity(record)  # not answering: forced stop by record
        else:
            proven = _broker_identity(client, record, status)
            client.drain(0.0, reason="codex-broker stop" + (" --force" if args.force else ""), force=args.force)
    if proven is None:  # the recorded broker is gone already
        assert record is not None
        pid = record.pid
    elif args.force:
        from proxy.contract import STOP_ESCALATION

        pid = proven.pid
        # As long as the broker's own forced stop can take (a turn slow to acknowledge its
        # interrupt is still reported to its client), then SIGKILL.
        if not _wait_exit(pid, proven.create_time, STOP_ESCALATION + FORCED_STOP_MARGIN,
                          "report its interrupted turns and exit"):
            _force_kill(record, proven)
    else:
        pid = proven.pid
        if not _wait_exit(pid, proven.create_time, args.timeout, "finish its turns and exit"):
            raise DrainTimeout(f"broker pid {pid} still draining after {args.timeout:g} s (stop --force interrupts)")
    if record is not None:
        from lifecycle.ensure import remove_session_dir, workspace_state

        workspace_state(args.cwd, os.environ)[1].clear(record)
        remove_session_dir(record)
    print(f"broker pid {pid} stopped")
    return EXIT_OK


def _recorded_identity(record: Any) -> Any:
    """The identity of a recorded broker that does not answer (``identity.prove_recorded_broker``),
    or None when it is no longer running; IdentityError when the pid is some other process."""
    from lifecycle import identity
    from proxy import contract

    if not identity.is_same_process(record.pid, record.create_time):
        return None
    try:
        socket_path = "" if contract.is_tcp(record.endpoint) else contract.parse_unix_endpoint(record.endpoint)
    except contract.EndpointError:
        socket_path = ""  # no listener can be asked: the command line is the proof
    return identity.prove_recorded_broker(record.pid, record.create_time, record.instance_id, socket_path)


def _force_kill(record: Any, proven: Any) -> None:
    """SIGKILL a proven broker that did not exit: by its record when it is the recorded one (its
    app-server's group too), else its own group, the create time checked right before."""
    import signal

    from lifecycle import identity
    from lifecycle.ensure import kill_broker

    if (record is not None and record.pid == proven.pid
            and abs(record.create_time - proven.create_time) <= identity.CREATE_TIME_TOLERANCE):
        kill_broker(record)
    else:
        identity.signal_verified(proven.pid, proven.create_time, signal.SIGKILL, group=True)
        identity.wait_gone(proven.pid, proven.create_time, 5.0)


def cmd_call(args: argparse.Namespace) -> int:
    from lifecycle.ensure import ensure_broker
    from lifecycle.errors import AppServerError, UsageError

    params = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise UsageError(f"PARAMS_JSON is not valid JSON: {exc}") from None
    session = ensure_broker(args.cwd, progress=_progress())
    _end_progress()
    with session.client() as client:
        try:
            result = client.call(args.method, params, timeout=args.timeout)
        except AppServerError as exc:
            _print_json({"error": {"code": exc.code, "message": exc.message, **(
                {"data": exc.data} if exc.data is not None else {})}})
            return EXIT_ERROR
    _print_json(result)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from lifecycle.gc import collect

    report = collect(os.environ, dry_run=args.dry_run)
    if args.json:
        _print_json(report)
    else:
        for line in report["actions"] or ["nothing to collect"]:
            print(line)
    return EXIT_OK


def cmd_companion(args: argparse.Namespace) -> int:
    """install / uninstall / status on each copy of the Codex companion; 1 when a copy fails or
    none is found (the per-copy results with --json), 2 for bad input."""
    from lifecycle import companion

    env = dict(os.environ)
    broker = os.path.abspath(args.codex_broker) if args.codex_broker else None
    if args.action == "install":
        broker = broker or companion.default_codex_broker()
        if not (os.path.isfile(broker) and os.access(broker, os.X_OK)):
            from lifecycle.errors import UsageError

            raise UsageError(f"--codex-broker {broker} is not an executable file")
    copies = companion.find_copies(env, args.plugin_dir, with_recorded=args.action != "install")
    if args.action == "install":
        assert broker is not None
        results = [companion.install(copy, env, broker, args.force) for copy in copies]
    elif args.action == "uninstall":
        results = [companion.uninstall(copy, env) for copy in copies]
    else:
        if broker is None:
            try:
                broker = companion.default_codex_broker()
            except companion.BrokerError:
                broker = None
        probes: dict[str, companion.Runnable] = {}
        results = [companion.status(copy, env, broker, probes) for copy in copies]
    ok = all(result.ok for result in results)
    if args.json:
        _print_json({"action": args.action, "ok": ok, "copies": [result.to_json() for result in results]})
    else:
        for result in results:
            print(companion.describe(result), file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if ok or args.action == "status" else EXIT_ERROR


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.cli import run_serve

    return run_serve(args)


# -- parsing -------------------------------------------------------------------------------
def _nonneg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from proxy.cli import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="codex-broker", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One healthy codex app-server broker per workspace.", epilog=__doc__.split("\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
                where: str = "cwd") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if where in ("cwd", "both"):
            p.add_argument("--cwd", default=None, help="the workspace (default: the current directory)")
        if where == "both":
            p.add_argument("--endpoint", default=None,
                           help="a broker endpoint (unix:PATH or tcp:HOST:PORT) instead of the workspace's")
            p.add_argument("--token-file", default=None, help="with a tcp: endpoint: the broker's token file")
        return p

    serve = command("serve", cmd_serve, "run a broker in the foreground", where="none")
    add_serve_arguments(serve)
    p = command("ensure", cmd_ensure, "start the workspace's broker, or reuse it if healthy")
    p.add_argument("--json", action="store_true", help="print endpoint, pid, instance_id, started_at, ... as JSON")
    p = command("status", cmd_status, "show the broker's state, sessions and in-flight turns", where="both")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=_nonneg, default=5.0, metavar="S")
    p = command("health", cmd_health, "ask grpc.health.v1 (never spawns); exit codes as grpc_health_probe",
                where="both")
    p.add_argument("--service", default="", help='service name ("" or codexbroker.v1.AppServer)')
    p.add_argument("--connect-timeout", type=_nonneg, default=1.0, metavar="S")
    p.add_argument("--timeout", type=_nonneg, default=1.0, metavar="S", help="RPC timeout")
    p = command("drain", cmd_drain, "ask the broker to drain: no new work, in-flight turns finish", where="both")
    p.add_argument("--deadline", type=_nonneg, default=0.0, metavar="S",
                   help="interrupt turns still running after this long (default: the broker's, 1 h)")
    p.add_argument("--force", action="store_true", help="interrupt in-flight turns now")
    p.add_argument("--reason", default=None)
    p.add_argument("--wait", action="store_true", help="wait until the broker has exited")
    p = command("rotate", cmd_rotate, "drain the workspace's broker and start a new one now")
    p.add_argument("--json", action="store_true")
    p = command("stop", cmd_stop, "stop the broker gracefully (drain, wait); --force interrupts turns",
                where="both")
    p.add_argument("--force", action="store_true", help="interrupt turns; kill the broker if it does not exit")
    p.add_argument("--timeout", type=_nonneg, default=None, metavar="S", help="give up waiting after S seconds")
    p = command("call", cmd_call, "ensure the broker, send one request, print the result as JSON")
    p.add_argument("method")
    p.add_argument("params", nargs="?", default=None, metavar="PARAMS_JSON")
    p.add_argument("--timeout", type=_nonneg, default=60.0, metavar="S")
    p = command("gc", cmd_gc, "stop this user's orphaned brokers and remove dead session directories",
                where="none")
    p.add_argument("--dry-run", action="store_true", help="only report what would be done")
    p.add_argument("--json", action="store_true")
    p = command("companion", cmd_companion, "put codex-broker behind the Codex companion for Claude Code "
                "(install), undo it (uninstall), or show each installed copy (status)", where="none")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--plugin-dir", default=None, metavar="DIR",
                   help="act on this plugin root (the folder holding scripts/app-server-broker.mjs) instead of "
                        "the copies Claude Code records")
    p.add_argument("--force", action="store_true", help="install: patch a broker file of unknown content too")
    p.add_argument("--codex-broker", default=None, metavar="PATH",
                   help="the codex-broker the launcher runs (default: this installation's)")
    p.add_argument("--json", action="store_true", help="print the result of each copy as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return int(args.func(args))
    import logging

    from lifecycle.errors import BrokerError

    # A path that is not valid UTF-8 (a workspace named so) prints escaped, never as a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.WARNING, format="codex-broker: %(message)s")
    try:
        return int(args.func(args))
    except BrokerError as exc:
        _end_progress()
        text = str(exc).replace("\n", "\n  ")
        print(f"codex-broker {args.command}: {text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _end_progress()
        print(f"codex-broker {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
