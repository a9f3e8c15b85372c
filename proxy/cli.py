"""``codex-broker serve`` (also ``python -m proxy serve``): run one broker in the foreground.

Exit codes: 0 clean stop (drained, aged past --max-age-hours, idle, signalled), 1 the app-server
died, was wedged for --exit-when-wedged seconds (or at all while draining) or could not be
initialized (or the broker failed), 2 bad input (missing app-server binary, bad endpoint,
occupied path, a max-age variable that is not a number of hours).

The log goes to stderr, or with ``--log-file PATH`` to that file, rotated by size: PATH never
passes ``--log-max-bytes`` (default 8 MiB); when it would, it becomes PATH's name with ``.1``
before the suffix (``broker.1.log``, replacing the previous one) and a fresh PATH starts, so a
broker's log takes at most twice the cap. The process's own stdout and stderr (a traceback,
grpc's native messages) follow the current file.

``--log-format json`` (or CODEX_BROKER_LOG_FORMAT=json) writes one JSON object per line instead:
time, level, event, pid and the event's fields; the app-server's stderr lines are carried inside
records (event "app-server stderr", field "line"), never raw. ``--log-level`` (or
CODEX_BROKER_LOG_LEVEL) sets the least severe record logged. Brokers the lifecycle spawns get
the spawner's environment, so the two variables reach them too."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping

from proxy import contract
from proxy.contract import DEFAULT_APP_SERVER, DEFAULT_LOG_MAX_BYTES

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing before the spawn
if TYPE_CHECKING:
    import asyncio

    from proxy.broker import Broker

MAX_RECORD = 16384  # characters of one log record's message (a traceback may follow)

class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        if len(message) > MAX_RECORD:
            message = f"{message[:MAX_RECORD]}... ({len(message)} characters)"
        text = f"{stamp}.{int(record.msecs):03d}Z codex-broker[{os.getpid()}] {record.levelname} {message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)[-MAX_RECORD:]
        return text


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, pid, then the record's fields. ``event``
    is the record's ``event`` (``extra={"event": ..., "fields": {...}}``) or else its message.
    Every string is escaped (JSON never spans lines; non-ASCII as \\u escapes, so any byte
    the app-server wrote can be carried)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        if len(message) > MAX_RECORD:
            message = f"{message[:MAX_RECORD]}... ({len(message)} characters)"
        out: dict[str, object] = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                                  "event": getattr(record, "event", None) or message, "pid": os.getpid()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)[-MAX_RECORD:]
        return json.dumps(out, default=str)


def setup_logging(log_file: str | None = None, max_bytes: int = DEFAULT_LOG_MAX_BYTES, *,
                  log_format: str = "text", level: str = "info") -> None:
    """Records at ``level`` and above go to stderr, or to ``log_file`` rotated at ``max_bytes``
    (OSError if it cannot be opened), as text or as JSON lines (``log_format``)."""
    handler: logging.Handler
    if log_file:
        from proxy.logfile import LogFile  # logging.handlers: only for a log file

        handler = LogFile(log_file, max_bytes)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _Formatter())
    for name in ("codex_broker.proxy", "codex_broker.lifecycle"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def split_app_server(flag: str | None, env: Mapping[str, str]) -> list[str]:
    """The one rule for the app-server command, shared by `serve` and the brokers lifecycle
    spawns: the flag, else CODEX_BROKER_APP_SERVER, else `codex app-server`; split shell-style.
    ValueError (naming the problem) for text that is not a command line."""
    text = flag if flag is not None else env.get("CODEX_BROKER_APP_SERVER") or DEFAULT_APP_SERVER
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"not a valid command line ({exc}): {text!r}") from None
    if not argv:
        raise ValueError("empty command")
    return argv


def app_server_command(flag: str | None) -> list[str]:
    try:
        return split_app_server(flag, os.environ)
    except ValueError as exc:
        raise SystemExit(f"codex-broker serve: bad app-server command: {exc}") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Serve's options, as the contract defines them (gc parses brokers' argv with the same)."""
    contract.add_serve_arguments(p)


def run_serve(args: argparse.Namespace) -> int:
    """Checks everything it can and spawns the app-server before importing the broker (grpc,
    protobuf, asyncio: most of a start), so the app-server starts while they load.

    The cyclic garbage collector is off until the broker is SERVING: a start creates tens of
    thousands of long-lived objects (modules, classes, descriptors) and next to no garbage, so
    the collections it would trigger are pure cost (~10 ms of a start). Once SERVING, what the
    start created is frozen (``gc.freeze``: no collection walks it again; unfrozen, the first
    collection would walk all of it, ~10 ms, and every full one after that) and the collector is
    on again; it is on again too whenever ``serve`` returns, SERVING or not.

    A SIGTERM or SIGINT before the broker's own handlers exist is only noted (raising from a
    signal handler could land inside the event loop, which would swallow it): after the imports
    it ends the start here, and once the broker runs, the broker acts on it as on its own."""
    gc.disable()
    try:
        return _serve(args)
    finally:
        gc.enable()


def _serve(args: argparse.Namespace) -> int:
    from proxy import child as child_process
    from proxy.config import BrokerFiles, ConfigError, ServeConfig, StartError

    try:
        log_format = contract.setting(args.log_format, os.environ, contract.LOG_FORMAT_ENV, contract.LOG_FORMATS,
                                          "text")
        log_level = contract.setting(args.log_level, os.environ, contract.LOG_LEVEL_ENV, contract.LOG_LEVELS,
                                         "info")
    except ValueError as exc:
        print(f"codex-broker serve: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(args.log_file, args.log_max_bytes, log_format=log_format, level=log_level)
    except OSError as exc:
        print(f"codex-broker serve: cannot open --log-file {args.log_file}: {exc.strerror}", file=sys.stderr)
        return 2
    log = logging.getLogger("codex_broker.proxy")

    def refuse(message: str, code: int) -> int:
        """One line on stderr (the log file's last line with --log-file), and the exit code."""
        print(f"codex-broker serve: {message}", file=sys.stderr, flush=True)
        return code

    from proxy import eventloop, scheduling

    try:
        loop_choice = eventloop.choice(args.event_loop, os.environ)
        cpu_scheduling = scheduling.choice(args.cpu_scheduling, os.environ)
    except (eventloop.EventLoopError, scheduling.SchedulingError) as exc:
        return refuse(str(exc), 2)
    cwd = os.path.abspath(args.cwd) if args.cwd else os.getcwd()
    if not os.path.isdir(cwd):
        return refuse(f"--cwd is not a directory: {cwd}", 2)
    try:
        max_age_hours = contract.max_age_hours(args.max_age_hours, os.environ)
    except contract.MaxAgeError as exc:
        return refuse(str(exc), 2)
    try:
        config = ServeConfig(endpoint=args.endpoint, app_server=app_server_command(args.app_server), cwd=cwd,
                             pid_file=os.path.abspath(args.pid_file) if args.pid_file else None,
                             probe_method=args.probe_method, probe_interval=args.probe_interval,
                             probe_timeout=args.probe_timeout, drain_deadline=args.drain_deadline,
                             idle_timeout=args.idle_timeout, session_buffer_bytes=args.session_buffer,
                             max_age_seconds=max_age_hours * 3600.0, exit_when_wedged=args.exit_when_wedged)
        if args.instance_id:
            config.instance_id = args.instance_id
        config.token_file = os.path.abspath(args.token_file) if args.token_file else None
        config.allow_remote = args.allow_remote
        config.jsonl_endpoint = args.jsonl_endpoint
        config.health_endpoint = args.health_endpoint
        config.metrics_endpoint = args.metrics_endpoint
    except SystemExit as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2
    files = BrokerFiles(config)
    early_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # noted, never raised (see the docstring)
        signal.signal(sig, lambda signum, _frame: early_signals.append(signum))
    child = None
    scheduled = scheduling.prepare(cpu_scheduling)  # here: the thread that runs the event loop
    try:
        subreaper = child_process.become_subreaper()  # before the spawn: the app-server's orphans come here
        try:
            files.prepare()  # before anything starts; leaves nothing behind when it refuses
            try:
                child = child_process.spawn(config.app_server, cwd=config.cwd)
            except ConfigError:
                files.remove()
                raise
            log.info("app-server started pid=%d", child.pid)
        except ConfigError as exc:
            return refuse(str(exc), 2)
        from proxy.broker import Broker  # the app-server starts meanwhile

        if early_signals:
            log.info("stopped by %s before ready", signal.Signals(early_signals[0]).name)
            files.remove()
            return 0
        _tune_malloc()
        try:
            loop_name, new_loop = eventloop.factory(loop_choice)
        except eventloop.EventLoopError as exc:
            files.remove()
            return refuse(str(exc), 2)
        log.info("event loop: %s", loop_name)
        log.info("cpu scheduling: %s", scheduled)
        try:
            broker = Broker(config, files=files, child=child, early_signals=early_signals, subreaper=subreaper)
            return eventloop.run(_run_broker(broker), new_loop)
        except ConfigError as exc:
            return refuse(str(exc), 2)
        except StartError as exc:
            return refuse(str(exc), 1)
        except Exception as exc:  # a bug: said once, in the log, with its traceback; exit 1
            log.error("the broker failed: %r", exc, exc_info=exc)
            return refuse(f"the broker failed: {exc!r}", 1)
    finally:
        # A SIGTERM from here on (a second client's teardown) has nothing left to stop, and must
        # not turn the exit status into a death: ignored until the process is gone (the
        # interpreter's finalization would put the default action back for a Python handler).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if child is not None:
            child_process.kill(child)  # a no-op when the broker stopped it (always, but for a crash)


async def _run_broker(broker: Broker) -> int:
    """``broker.run()``, with the garbage collector settled once the broker is ready."""
    import asyncio

    settle = asyncio.ensure_future(_settle_gc(broker.ready))
    try:
        return await broker.run()
    finally:
        settle.cancel()


async def _settle_gc(ready: asyncio.Event) -> None:
    """Once ``ready``: what the start created leaves the collector's sight, and it runs again."""
    await ready.wait()
    gc.freeze()
    gc.enable()


def _tune_malloc() -> None:
    """A fixed mmap threshold (glibc): allocations over 4 MiB (a many-MB result passing through)
    are mapped and returned to the system when freed, instead of raising the dynamic threshold
    and leaving the heap grown for the rest of the broker's life."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD, above the largest batched frame
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run a broker in the foreground"))
    args = parser.parse_args(argv)
    return run_serve(args)
