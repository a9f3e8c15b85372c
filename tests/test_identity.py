"""Process identity: nothing is signalled unless pid and create time still match."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lifecycle.errors import IdentityError
from lifecycle.identity import (
    is_same_process,
    peer_credentials,
    process_create_time,
    prove_broker,
    prove_recorded_broker,
    runs_instance,
    signal_verified,
    wait_gone,
)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A `sleep 30` child; always killed and reaped by its own pid, whatever the test did."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _create_time(pid: int) -> float:
    created = process_create_time(pid)
    assert created is not None
    return created


def test_is_same_process_for_self_and_for_a_wrong_create_time() -> None:
    me = os.getpid()
    assert is_same_process(me, _create_time(me))
    assert not is_same_process(me, _create_time(me) - 5.0)


def test_a_gone_process_has_no_create_time(sleeper: subprocess.Popen[bytes]) -> None:
    created = _create_time(sleeper.pid)
    sleeper.kill()
    sleeper.wait(timeout=10)
    assert process_create_time(sleeper.pid) is None
    assert not is_same_process(sleeper.pid, created)


def test_zombie_is_not_the_same_process(sleeper: subprocess.Popen[bytes]) -> None:
    created = _create_time(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    _await_zombie(sleeper.pid)  # killed, not yet reaped
    assert process_create_time(sleeper.pid) is None
    assert not is_same_process(sleeper.pid, created)
    assert wait_gone(sleeper.pid, created, timeout=0)


def _await_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "child never became a zombie"
        time.sleep(0.005)


def test_signal_refused_for_a_mismatched_create_time(sleeper: subprocess.Popen[bytes]) -> None:
    wrong = _create_time(sleeper.pid) - 100.0
    assert signal_verified(sleeper.pid, wrong, signal.SIGKILL) is False
    assert sleeper.poll() is None
    assert is_same_process(sleeper.pid, _create_time(sleeper.pid))


def test_signal_sent_for_the_right_create_time(sleeper: subprocess.Popen[bytes]) -> None:
    assert signal_verified(sleeper.pid, _create_time(sleeper.pid), signal.SIGTERM) is True
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


@pytest.mark.parametrize("pid", [0, -1], ids=["pid-zero", "pid-negative"])
def test_group_addressing_pids_are_never_signalled(pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError(f"signal sent: {args}")

    monkeypatch.setattr(os, "kill", forbidden)
    monkeypatch.setattr(os, "killpg", forbidden)
    assert signal_verified(pid, 0.0, signal.SIGTERM, group=True) is False


def test_group_mode_kills_the_leader_and_its_children() -> None:
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert leader.stdout is not None
        child = int(leader.stdout.readline())
        child_created = _create_time(child)
        assert signal_verified(leader.pid, _create_time(leader.pid), signal.SIGKILL, group=True)
        assert leader.wait(timeout=10) == -signal.SIGKILL
        assert wait_gone(child, child_created, timeout=10)  # not our child: the polling path
    finally:
        if leader.poll() is None:
            leader.kill()
        leader.wait(timeout=10)
        if leader.stdout is not None:
            leader.stdout.close()


def test_group_mode_signals_only_the_pid_when_it_does_not_lead_its_group(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sleeper shares our process group; signalling the group would hit the test runner."""

    def forbidden(*args: object) -> None:
        raise AssertionError(f"killpg called: {args}")

    monkeypatch.setattr(os, "killpg", forbidden)
    assert signal_verified(sleeper.pid, _create_time(sleeper.pid), signal.SIGTERM, group=True)
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


def test_wait_gone_times_out_on_a_live_process(sleeper: subprocess.Popen[bytes]) -> None:
    assert wait_gone(sleeper.pid, _create_time(sleeper.pid), timeout=0.1) is False
    assert sleeper.poll() is None


def test_wait_gone_is_immediate_for_another_process_by_create_time(sleeper: subprocess.Popen[bytes]) -> None:
    assert wait_gone(sleeper.pid, _create_time(sleeper.pid) - 100.0, timeout=30) is True
    assert sleeper.poll() is None


def test_peer_credentials_name_the_listening_process(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    assert peer_credentials(path) is None  # nothing there
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        assert peer_credentials(path) is None  # bound, not listening: refused
        listener.listen(1)
        assert peer_credentials(path) == (os.getpid(), os.getuid())


def test_an_instance_id_among_arguments_is_not_a_broker_running_it() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "serve", "--endpoint",
                             "unix:/tmp/x/s.sock", "--instance-id", "inst-1"])
    try:
        created = _create_time(proc.pid)
        assert not runs_instance(proc.pid, "inst-1")
        with pytest.raises(IdentityError, match="not a codex-broker serve process"):
            prove_recorded_broker(proc.pid, created, "inst-1", "/tmp/x/s.sock")
        with pytest.raises(IdentityError, match="not a codex-broker serve process"):
            prove_broker("tcp:127.0.0.1:1", proc.pid, "inst-1")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_prove_broker_refuses_a_pid_that_does_not_listen_on_the_unix_endpoint(
        sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        with pytest.raises(IdentityError, match=f"the process listening there is pid {os.getpid()}"):
            prove_broker(f"unix:{path}", sleeper.pid, "any")
        assert prove_broker(f"unix:{path}", os.getpid(), "any").pid == os.getpid()
    with pytest.raises(IdentityError, match="not a running process"):
        prove_broker(f"unix:{path}", 0, "any")
