"""Process and waiting helpers shared by the test support modules: finding the processes a
test started (by a marker on their command line), waiting for them to exit, and polling a
condition that has no event to wait on."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import psutil

WAIT = 30.0  # generous default for waiting on an event


def processes_with(text: str, *, exact: bool = False) -> list[psutil.Process]:
    """Live (non-zombie) processes of this user with ``text`` in an argument (or as a whole
    argument, ``exact``)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "uids"]):
        info = proc.info
        try:
            if info["status"] == psutil.STATUS_ZOMBIE or not info["uids"] or info["uids"].real != os.getuid():
                continue
            cmdline = info["cmdline"] or ()
            if text in cmdline if exact else any(text in part for part in cmdline):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return found


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "?"


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until every process has exited (a zombie counts as exited); returns the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if not gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Polls a condition that has no event to wait on; returns its first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
