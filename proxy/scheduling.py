"""The CPU scheduling policy `serve` runs under (Linux).

``batch`` by default: the broker puts itself under SCHED_BATCH, and its app-server is spawned
under the policy the broker was started with. ``serve --cpu-scheduling batch|normal`` or the
same in CODEX_BROKER_CPU_SCHEDULING chooses; ``normal`` leaves the policy as it was started.

Why: a broker is a relay between two busy processes, the app-server writing a turn's
notifications and the client reading them. Under the normal policy the kernel lets a process
that wakes up preempt one that is running, so each write of the app-server woke the broker at
once, to relay a few kilobytes, taking a core from the app-server or the client each time. On a
machine with fewer cores than busy processes, those switches are the broker's largest cost
per notification. SCHED_BATCH is the normal policy without that preemption on wake-up: the
broker runs when a core comes free (at once, on a machine with an idle core, so a request's
round trip is unchanged there) and relays what has piled up meanwhile in one go. On two cores
that cut the broker's CPU per relayed notification by about a third and raised one client's
notification stream from ~78 % to ~84 % of a direct pipe's (docs/BENCHMARKS.md). Its priority
(nice value) is unchanged.

Only a broker started under the normal policy (SCHED_OTHER) changes it: one started under
another (batch already, idle, real-time: ``chrt``, systemd's CPUSchedulingPolicy=) is left as
it is. A thread's policy is its own, and threads inherit it from the thread that starts them:
`serve` sets it first thing, before any thread of its own starts, so all of them run under it.
The app-server, started by fork and exec, would inherit it too: ``child_policy`` is what the
spawn puts back in the child (proxy/child.py), so the app-server and everything it runs are
scheduled as they would be without codex-broker."""
from __future__ import annotations

import os
from collections.abc import Mapping

CPU_SCHEDULING_ENV = "CODEX_BROKER_CPU_SCHEDULING"
BATCH, NORMAL = "batch", "normal"
CHOICES = (BATCH, NORMAL)

_POLICY_NAMES = {getattr(os, name): name[6:].lower()
                 for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
                 if hasattr(os, name)}
_for_children: int | None = None  # the policy the broker was started with, once it changed its own


class SchedulingError(Exception):
    """A policy name that is none of CHOICES."""


def choice(flag: str | None, environ: Mapping[str, str]) -> str:
    """The policy asked for: the flag, else the variable, else batch. SchedulingError for a
    name that is none of CHOICES."""
    value = flag if flag else (environ.get(CPU_SCHEDULING_ENV) or BATCH)
    value = value.strip().lower()
    if value not in CHOICES:
        source = "--cpu-scheduling" if flag else CPU_SCHEDULING_ENV
        raise SchedulingError(f"{source} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def policy_name(policy: int) -> str:
    """``batch``, ``other``, ``idle``... for a policy number (a SCHED_RESET_ON_FORK flag ignored)."""
    reset_on_fork = getattr(os, "SCHED_RESET_ON_FORK", 0)
    return _POLICY_NAMES.get(policy & ~reset_on_fork, str(policy))


def apply(asked: str) -> str:
    """Puts this thread (the process, when it has no other thread yet) under ``asked``; what
    it runs under then, said for the log. Never fails: where the policy cannot be had (not
    Linux, refused), the broker runs as it was started, and says so."""
    global _for_children
    if not hasattr(os, "sched_getscheduler") or not hasattr(os, "SCHED_BATCH"):
        return "as started (this platform has no scheduling policies)"
    started = os.sched_getscheduler(0)
    if asked == NORMAL:
        return f"as started ({policy_name(started)})"
    if started != os.SCHED_OTHER:
        return f"as started ({policy_name(started)}, which batch does not replace)"
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        return f"as started ({policy_name(started)}; batch was refused: {exc.strerror})"
    _for_children = started
    return f"batch (the app-server runs as the broker was started: {policy_name(started)})"


def child_policy() -> int | None:
    """The policy a child must be put back under (what the broker was started with), or None
    when the broker runs under that still."""
    return _for_children


def restore_in_child(policy: int | None) -> None:
    """In a forked child before exec: back under ``policy`` (from ``child_policy``), if any.
    Going from batch back to the normal policy is never refused; were it, the child runs on
    under batch, which only takes its wake-up preemption."""
    if policy is not None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            pass
