"""``codex-broker serve`` (also ``python -m proxy serve``): run one broker in the foreground.

Exit codes: 0 clean stop (drained, idle, signalled), 1 the app-server died or could not be
initialized, 2 bad input (missing app-server binary, bad endpoint, occupied path)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping

from proxy import contract
from proxy.contract import DEFAULT_APP_SERVER


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z codex-broker[{os.getpid()}] {record.levelname} {record.getMessage()}"


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    for name in ("codex_broker.proxy", "codex_broker.lifecycle"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
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

    A SIGTERM or SIGINT before the broker's own handlers exist is only noted (raising from a
    signal handler could land inside the event loop, which would swallow it): after the imports
    it ends the start here, and once the broker runs, the broker acts on it as on its own."""
    from proxy import child as child_process
    from proxy.config import BrokerFiles, ConfigError, ServeConfig, StartError

    setup_logging()
    log = logging.getLogger("codex_broker.proxy")
    cwd = os.path.abspath(args.cwd) if args.cwd else os.getcwd()
    if not os.path.isdir(cwd):
        print(f"codex-broker serve: --cwd is not a directory: {cwd}", file=sys.stderr)
        return 2
    try:
        config = ServeConfig(endpoint=args.endpoint, app_server=app_server_command(args.app_server), cwd=cwd,
                             pid_file=os.path.abspath(args.pid_file) if args.pid_file else None,
                             probe_method=args.probe_method, probe_interval=args.probe_interval,
                             probe_timeout=args.probe_timeout, drain_deadline=args.drain_deadline,
                             idle_timeout=args.idle_timeout, session_buffer_bytes=args.session_buffer)
        if args.instance_id:
            config.instance_id = args.instance_id
        config.token_file = os.path.abspath(args.token_file) if args.token_file else None
        config.allow_remote = args.allow_remote
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    files = BrokerFiles(config)
    early_signals: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: early_signals.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    child = None
    try:
        try:
            files.prepare()  # before anything starts; leaves nothing behind when it refuses
            try:
                child = child_process.spawn(config.app_server, cwd=config.cwd)
            except ConfigError:
                files.remove()
                raise
            log.info("app-server started pid=%d", child.pid)
        except ConfigError as exc:
            print(f"codex-broker serve: {exc}", file=sys.stderr)
            return 2
        from proxy.broker import Broker  # the app-server starts meanwhile

        if early_signals:
            log.info("stopped by %s before ready", signal.Signals(early_signals[0]).name)
            files.remove()
            return 0
        _tune_malloc()
        try:
            import asyncio

            return asyncio.run(Broker(config, files=files, child=child, early_signals=early_signals).run())
        except ConfigError as exc:
            print(f"codex-broker serve: {exc}", file=sys.stderr)
            return 2
        except StartError as exc:
            print(f"codex-broker serve: {exc}", file=sys.stderr)
            return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child is not None:
            child_process.kill(child)  # a no-op when the broker stopped it (always, but for a crash)


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
