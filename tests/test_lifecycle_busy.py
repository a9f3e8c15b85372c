"""ensure never kills a broker that is busy rather than wedged.

A broker stopped and continued in short bursts (SIGSTOP/SIGCONT, each stop shorter than the hang
threshold) answers late, not never. ensure calls it wedged only after silence across several
attempts over the wedge window (the hang threshold plus a margin), and a late answer counts as
alive, so ensures running back to back all the while reuse it, and the turn it runs completes.
Before, one Health that took longer than 2 s was enough to SIGKILL the broker with its turn."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_support import World, process, world_for

from lifecycle.decide import HANG_THRESHOLD, WEDGE_WINDOW

STOP_SECONDS = 2.4  # each stop: longer than the old single 2 s attempt, shorter than the hang threshold
RUN_SECONDS = 0.6
BURSTS = 6


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def test_a_broker_stopped_in_short_bursts_with_a_turn_running_is_reused_by_concurrent_ensures(
        world: World) -> None:
    assert STOP_SECONDS < HANG_THRESHOLD and STOP_SECONDS + RUN_SECONDS < WEDGE_WINDOW
    broker = world.ensure()
    proc = process(broker.pid)
    turn = world.turn(broker.endpoint, f"seconds={BURSTS * (STOP_SECONDS + RUN_SECONDS) - 4:.0f} deltas=60",
                      timeout=90)
    turn.wait_first_delta()
    bursts_over = threading.Event()
    seen: list[tuple[str, int, str]] = []
    failures: list[BaseException] = []

    def ensure_back_to_back() -> None:
        while not bursts_over.is_set():
            try:
                session = world.ensure()
            except BaseException as exc:  # handed to the test thread
                failures.append(exc)
                return
            seen.append((session.verdict, session.pid, session.reason))

    ensurer = threading.Thread(target=ensure_back_to_back, name="ensure-loop", daemon=True)
    ensurer.start()
    try:
        for _ in range(BURSTS):
            if not proc.is_running():
                break  # killed: reported below
            proc.send_signal(signal.SIGSTOP)  # psutil checks it is still the same process
            bursts_over.wait(STOP_SECONDS)  # the fault's shape, not a synchronization
            proc.send_signal(signal.SIGCONT)
            bursts_over.wait(RUN_SECONDS)
    finally:
        if proc.is_running():
            proc.send_signal(signal.SIGCONT)
        bursts_over.set()
        ensurer.join(timeout=60)

    assert not failures, failures
    assert seen and {(verdict, pid) for verdict, pid, _ in seen} == {("live", broker.pid)}, seen
    assert proc.is_running(), "the busy broker was killed"
    assert turn.result()["status"] == "completed"
    assert len(turn.deltas) == 60
    assert [p.pid for p in world.brokers()] == [broker.pid]
