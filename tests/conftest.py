"""Fixtures for the broker integration tests (the helpers themselves live in harness.py).

- ``broker``: a factory that starts ``python -m proxy serve`` in front of the fake and (unless
  ``ready=False``) returns when its Health Watch says SERVING. A broker left draining turns may
  take its time over SIGTERM.
- ``served``: the same for the fault tests, each broker SERVING before it is returned, and one
  that is still running 3 s after SIGTERM is a failure.
- ``base``: a fresh short directory (socket paths fit), removed afterwards.

On teardown each broker is stopped by its PID and the test fails if it left a process or its
socket directory behind.
"""
from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import BrokerProcess, serve, short_dir


def _stop_all(started: list[BrokerProcess]) -> None:
    problems = []
    for b in started:
        problems += [f"{p}\n--- log of broker {b.pid} ---\n{b.tail()}" for p in b.stop()]
    assert not problems, "\n".join(problems)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Factory: ``broker(*flags, fake_args=(), env={}, app_server=None, via_env=False, ready=True)``."""
    started: list[BrokerProcess] = []
    counter = itertools.count(1)

    def start(*flags: str, ready: bool = True, **kw: Any) -> BrokerProcess:
        b = BrokerProcess(*flags, log_path=tmp_path / f"broker{next(counter)}.log", **kw)
        started.append(b)
        if ready:
            b.wait_ready()
        return b

    yield start
    _stop_all(started)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Factory: ``served(*flags, fake_args=(), env={}, ready_timeout=20)``, SERVING when returned."""
    started: list[BrokerProcess] = []

    def start(*flags: str, **kw: Any) -> BrokerProcess:
        b = serve(*flags, log_path=tmp_path / f"broker{len(started) + 1}.log", **kw)
        started.append(b)
        return b

    yield start
    _stop_all(started)


@pytest.fixture
def base() -> Iterator[str]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
