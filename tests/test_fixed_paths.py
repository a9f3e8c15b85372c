"""A fixed socket path survives a crash: `serve` takes over a socket nobody accepts on, under a
lock file beside it held for the broker's whole life, and refuses (exit 2) a live socket, a full
backlog, or a path whose lock another broker still holds."""
from __future__ import annotations

import errno
import os
import signal
import socket
import stat

import pytest
from harness import SERVING, BrokerProcess, error_lines, fake_command, new_marker, run_serve, serve
from proc_support import processes_with, wait_gone

from proxy.config import LIVE, STALE, liveness_from_errno


def stop_quietly(b: BrokerProcess) -> None:
    """Stops ``b``; a socket directory the broker did not create may stay (it is the fixed one)."""
    problems = [p for p in b.stop() if not p.startswith("broker exited")]
    assert not problems, problems


def refused(result, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_only_a_refused_or_missing_socket_counts_as_dead():
    assert liveness_from_errno(errno.ECONNREFUSED) == STALE
    assert liveness_from_errno(errno.ENOENT) == STALE
    assert liveness_from_errno(errno.EAGAIN) == LIVE  # a full backlog: somebody is there
    assert liveness_from_errno(None) == LIVE
    with pytest.raises(OSError):
        liveness_from_errno(errno.EACCES)


def test_serve_takes_over_the_socket_a_killed_broker_left(base):
    first = serve(base=base)
    try:
        app = first.app_server
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        assert not wait_gone([app], 10.0)
        assert stat.S_ISSOCK(os.lstat(first.sock).st_mode), "the killed broker's socket should be left"
    finally:
        first.stop()
    os.makedirs(first.dir, 0o700, exist_ok=True)  # stop() removed the base; rebuild the crash's leftovers
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(first.sock)  # bound, never accepting: what a killed broker leaves
    second = serve(base=base)
    try:
        assert second.health() == SERVING
        assert os.path.exists(second.sock + ".lock")
        second.drain(5)
        assert second.wait_exit() == 0
        assert not os.path.lexists(second.sock)
        assert not os.path.lexists(second.sock + ".lock")
    finally:
        stop_quietly(second)


def test_a_broker_still_stopping_keeps_its_path_and_its_successor_refuses(base):
    first = serve(base=base)
    try:
        first.proc.send_signal(signal.SIGSTOP)  # a broker slow to stop: it still holds the lock
        os.unlink(first.sock)  # its socket already gone, as when a wedged broker exits
        marker = new_marker()
        result = run_serve("--endpoint", first.endpoint, "--app-server", fake_command(marker=marker))
        refused(result, "already in use", first.sock + ".lock")
        assert not os.path.lexists(first.sock), "the refused broker must leave nothing at the path"
        assert not processes_with(marker)
        first.proc.send_signal(signal.SIGCONT)
    finally:
        first.proc.send_signal(signal.SIGCONT)
        stop_quietly(first)


def test_serve_refuses_a_socket_whose_backlog_is_full(base):
    sock_dir = os.path.join(base, "d")
    os.mkdir(sock_dir, 0o700)
    path = os.path.join(sock_dir, "s.sock")
    clients: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(path)
        busy.listen(0)
        try:
            while True:  # fill the backlog until a connect would block
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                clients.append(client)
                try:
                    client.connect(path)
                except BlockingIOError:
                    break
                assert len(clients) < 100, "the backlog never filled"
            marker = new_marker()
            result = run_serve("--endpoint", f"unix:{path}", "--app-server", fake_command(marker=marker))
            refused(result, "already in use", path)
            assert stat.S_ISSOCK(os.lstat(path).st_mode), "a busy broker's socket was removed"
            assert not os.path.lexists(path + ".lock")
            assert not processes_with(marker)
        finally:
            for client in clients:
                client.close()


def test_serve_refuses_a_path_that_is_not_a_socket(base):
    sock_dir = os.path.join(base, "d")
    os.mkdir(sock_dir, 0o700)
    path = os.path.join(sock_dir, "s.sock")
    with open(path, "w") as f:
        f.write("not a socket")
    result = run_serve("--endpoint", f"unix:{path}", "--app-server", fake_command(marker=new_marker()))
    refused(result, "not a socket", path)
    with open(path) as f:
        assert f.read() == "not a socket"
    assert os.listdir(sock_dir) == ["s.sock"]
