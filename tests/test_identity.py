"""Process identity: nothing is signalled unless pid and create time still match."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from lifecycle.identity import is_same_process, process_create_time, signal_verified, wait_gone


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
