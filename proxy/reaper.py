"""The broker's descendants beyond the app-server, in a process that is a child subreaper
(`serve` only: ``proxy.child.become_subreaper``).

A tool command the app-server starts with setsid leaves its process group, so stopping that
group does not reach it; when its parent exits it is reparented to the broker instead of init.
While the broker runs, such orphans are reaped when they exit (on SIGCHLD); at the end, every
descendant still there is signalled (SIGTERM, then SIGKILL) and reaped.

Reaping is by pid, only of children known to be zombies, and never of the pids ``keep``
returns (the app-server, whose exit status belongs to the code that waits for it): never
``waitpid(-1)``. Signals go through psutil, which checks that the pid still names the process
that was listed (create time), so a recycled pid is never signalled."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

import psutil

from proxy.contract import TERM_GRACE

log = logging.getLogger("codex_broker.proxy")

ROUNDS = 5  # grandchildren of a killed orphan are reparented to us: look again, this often at most


class Reaper:
    def __init__(self, keep: Callable[[], set[int]]):
        self._keep = keep  # children whose exit status belongs to someone else
        self.reaped = 0

    def _children(self, recursive: bool = False) -> list[psutil.Process]:
        try:
            children = psutil.Process().children(recursive=recursive)
        except psutil.Error:
            return []
        keep = self._keep()
        return [child for child in children if child.pid not in keep]

    def reap_orphans(self) -> None:
        """Reaps the children (other than ``keep``) that have exited; on SIGCHLD."""
        for child in self._children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    continue
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                continue
            if pid:
                self.reaped += 1
                log.info("reaped orphaned descendant pid=%d (%s)", pid, _describe(status))

    async def stop_descendants(self) -> None:
        """SIGTERM every descendant left (other than ``keep``), SIGKILL those that stay, reap."""
        for _ in range(ROUNDS):
            procs = self._children(recursive=True)
            if not procs:
                return
            log.warning("stopping the descendants left behind (%d): %s", len(procs),
                        ", ".join(f"{p.pid} {_name(p)}" for p in procs[:10]))
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for proc in procs:
                    try:
                        proc.send_signal(sig)
                    except psutil.Error:
                        pass
                # wait_procs reaps those that are our children (by pid) and polls the others
                _, procs = await asyncio.to_thread(psutil.wait_procs, procs, TERM_GRACE)
                if not procs:
                    break
            self.reap_orphans()


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
