"""The unix socket is the access boundary: socket 0600 inside a 0700 directory owned by the
user, for a broker started by hand (``python -m proxy serve``) and for one spawned by
``ensure_broker`` (whose runtime and state directories are private too).

Another local user must not get in. As root (as CI runs) the tests create an unprivileged user
(``cxbtest``, no home, no login shell) and try to connect as that user: a raw connect() and,
when that user's Python can import grpcio, real gRPC calls. Without root or passwordless sudo
the mode checks still run and the test then fails, saying what it needs; it never skips."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_support import OtherUser
from harness import fake_command, new_marker, processes_with, serve, short_dir, wait_gone

from lifecycle import identity
from lifecycle.ensure import ensure_broker
from lifecycle.spawn import runtime_dir


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_private(sock: str) -> None:
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode), f"{sock} is not a socket"
    assert mode(sock) == 0o600, f"socket mode {mode(sock):o}"
    directory = os.path.dirname(sock)
    assert mode(directory) == 0o700, f"socket directory mode {mode(directory):o}"
    for path in (sock, directory):
        assert os.lstat(path).st_uid == os.getuid(), f"{path} is not owned by us"


@pytest.fixture(scope="module")
def other() -> OtherUser:
    return OtherUser()


def require(other: OtherUser) -> None:
    if not other.available:
        pytest.fail(f"cannot prove that another user is refused: {other.reason}")


@pytest.fixture
def world_socket() -> Iterator[str]:
    """A listening unix socket anyone may connect to (0755 directory, 0666 socket): the control
    that shows the other user's connect() works at all, so a refusal means the permissions."""
    base = short_dir("cxba")
    os.chmod(base, 0o755)
    path = os.path.join(base, "open.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    os.chmod(path, 0o666)
    try:
        yield path
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(base)


def assert_refused(other: OtherUser, sock: str, endpoint: str, world_socket: str) -> None:
    control = other.connect(world_socket)
    assert control == {"connected": True}, f"control: user {other.name} cannot connect anywhere: {control}"
    attempt = other.connect(sock)
    assert attempt["connected"] is False, f"user {other.name} connected to {sock}"
    assert attempt["errno"] == errno.EACCES, attempt
    env = other.grpc_env()
    if env is None:
        print(f"note: {other.python} cannot import grpcio as {other.name}; the raw connect() is the proof")
        return
    for rpc, outcome in other.grpc_rpcs(endpoint, env).items():
        assert outcome["ok"] is False, f"{rpc} succeeded as user {other.name}"
        assert outcome["code"] == "UNAVAILABLE" and "Permission denied" in outcome["details"], (rpc, outcome)


def test_served_broker_socket_is_0600_in_a_0700_dir_and_another_user_cannot_connect(
        tmp_path, other, world_socket):
    b = serve(log_path=tmp_path / "broker.log")
    try:
        assert_private(b.sock)
        assert b.health_name() == "SERVING"  # the owner gets in
        require(other)
        assert_refused(other, b.sock, b.endpoint, world_socket)
        # The socket's own mode refuses too, even with the directory opened for traversal.
        os.chmod(b.dir, 0o711)
        try:
            attempt = other.connect(b.sock)
        finally:
            os.chmod(b.dir, 0o700)
        assert attempt["connected"] is False and attempt["errno"] == errno.EACCES, attempt
        assert b.health_name() == "SERVING"
        assert b.status().open_sessions == 0
    finally:
        problems = b.stop()
    assert not problems, problems


def test_ensured_broker_lives_in_private_dirs_and_another_user_cannot_connect(
        tmp_path, monkeypatch, other, world_socket):
    marker = new_marker()
    state, runtime, workspace = short_dir("cxbs"), short_dir("cxbr"), tmp_path / "ws"
    os.rmdir(runtime)  # ensure creates it, 0700
    workspace.mkdir()
    monkeypatch.setenv("CODEX_BROKER_STATE_DIR", state)
    monkeypatch.setenv("CODEX_BROKER_RUNTIME_DIR", runtime)
    monkeypatch.setenv("CODEX_BROKER_APP_SERVER", fake_command(marker=marker))
    b = None
    try:
        b = ensure_broker(workspace)
        sock = b.endpoint.removeprefix("unix:")
        assert_private(sock)
        assert mode(runtime) == 0o700 and runtime_dir(os.environ) == Path(runtime)
        record = next(Path(state, "workspaces").iterdir()) / "broker.json"
        assert mode(state) == 0o700 and mode(record.parent) == 0o700 and mode(record) == 0o600
        with b.client() as client:
            assert client.health() == "SERVING"
        require(other)
        assert_refused(other, sock, b.endpoint, world_socket)
        probe = other.run([other.python or sys.executable, "-c", f"open({str(record)!r}).read()"])
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, probe
    finally:
        if b is not None:
            with b.client() as client:
                client.drain(0.0, reason="test over")
            created = identity.process_create_time(b.pid)
            if created is not None and not identity.wait_gone(b.pid, created, 30):
                os.kill(b.pid, signal.SIGKILL)  # the pid ensure_broker recorded
        left = wait_gone(processes_with(marker), 10)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    assert not left, f"processes left behind: {left}"
