#!/usr/bin/env python3
"""A stand-in for ``codex-broker`` behind the companion launcher (stdlib only).

It records what it was run with as one JSON line in ``$STAND_IN_LOG`` ({"event": "start", "argv",
"pid", "pgid"}), then behaves as ``$STAND_IN_MODE`` says:

  serve   listen on --jsonl-endpoint and --endpoint (unix sockets), write --pid-file; on SIGTERM
          record {"event": "SIGTERM"}, remove the sockets and the pid file, exit $STAND_IN_EXIT (0).
  linger  as serve, but on SIGTERM wait until the JSONL socket's path is gone (the companion's
          clean-up ran), then exit $STAND_IN_EXIT without removing anything.
  exit    exit $STAND_IN_EXIT (3) at once, listening on nothing.
  late    sleep $STAND_IN_DELAY seconds (1.6), then exit $STAND_IN_EXIT (5), listening on nothing.

``serve --help`` prints serve's options (--jsonl-endpoint among them) and exits 0, as codex-broker does.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


def option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def record(event: dict[str, object]) -> None:
    with open(os.environ["STAND_IN_LOG"], "a") as f:
        f.write(json.dumps(event) + "\n")


def listen(endpoint: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(endpoint.removeprefix("unix:"))
    sock.listen(16)
    return sock


def main() -> int:
    argv = sys.argv[1:]
    if argv == ["serve", "--help"]:
        print("usage: codex-broker serve --endpoint ENDPOINT [--jsonl-endpoint ENDPOINT] [--pid-file F] ...")
        return 0
    mode = os.environ.get("STAND_IN_MODE", "serve")
    record({"event": "start", "argv": argv, "pid": os.getpid(), "pgid": os.getpgid(0)})
    if mode == "exit":
        return int(os.environ.get("STAND_IN_EXIT", "3"))
    if mode == "late":
        time.sleep(float(os.environ.get("STAND_IN_DELAY", "1.6")))
        return int(os.environ.get("STAND_IN_EXIT", "5"))
    jsonl, grpc, pid_file = option(argv, "--jsonl-endpoint"), option(argv, "--endpoint"), option(argv, "--pid-file")
    assert jsonl and grpc
    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
    servers = [listen(grpc), listen(jsonl)]
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    while not terminated:
        signal.pause()  # the handler above ends the pause
    record({"event": "SIGTERM", "count": len(terminated)})
    paths = [endpoint.removeprefix("unix:") for endpoint in (jsonl, grpc)] + ([pid_file] if pid_file else [])
    if mode == "linger":
        while os.path.exists(paths[0]):
            time.sleep(0.02)
        return int(os.environ.get("STAND_IN_EXIT", "0"))
    for server in servers:
        server.close()
    for path in paths:
        os.unlink(path)
    return int(os.environ.get("STAND_IN_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(main())
