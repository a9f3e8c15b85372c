"""The CPU scheduling policy of the broker's event loop (Linux): SCHED_BATCH while the
app-server streams fast, the normal policy otherwise.

``batch`` by default: `serve --cpu-scheduling batch|normal` or the same in
CODEX_BROKER_CPU_SCHEDULING chooses; ``normal`` never changes the policy.

Why: while a turn streams, a broker is a relay between two busy processes, the app-server
writing notifications and the client reading them. Under the normal policy the kernel lets a
process that wakes up preempt the one running, so each write of the app-server woke the broker
at once to relay a few kilobytes, taking a core from the app-server or the client each time; on
a machine with fewer cores than busy processes those switches were the broker's largest cost per
notification. SCHED_BATCH is the normal policy without that preemption on wake-up: the broker
runs when a core comes free and relays what piled up meanwhile in one go, ~300 notifications per
read instead of ~70. On two cores that cut the broker's CPU per relayed notification by a fifth
to a third and raised one client's stream from ~78 % to ~85 % of a direct pipe's
(docs/BENCHMARKS.md).

Between streams it costs: a request's round trip was ~5-10 % slower under batch (the broker,
woken by the client's write on the client's core, waits for the client to block instead of
preempting it). So the event loop's thread is under batch only while the app-server streams
fast: from ENTER_BYTES written within ENTER_WINDOW (~3 MiB/s: a flood of deltas, a command's
large output; a model's own streaming is far below it, and so are requests and their answers),
until a WINDOW passes below STAY_RATE, 1 MiB/s (``StreamPacer``). Only that thread switches (a
thread's policy is its own): it reads the app-server and does all the routing. Its nice value
never changes.

Only a broker started under the normal policy (SCHED_OTHER) switches: one started under another
(batch already, idle, real-time: ``chrt``, systemd's CPUSchedulingPolicy=) is left as it is.
A child spawned while the thread is under batch would inherit it: ``child_policy`` is what the
spawn puts back in the child (proxy/child.py), so the app-server and everything it runs are
always scheduled as they would be without codex-broker."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from proxy.contract import setting

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing before the spawn (proxy.child)
if TYPE_CHECKING:
    from typing import Protocol

    class _Timer(Protocol):
        def cancel(self) -> None: ...

    class _Loop(Protocol):
        def time(self) -> float: ...
        def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer: ...

log = logging.getLogger("codex_broker.proxy")

CPU_SCHEDULING_ENV = "CODEX_BROKER_CPU_SCHEDULING"
BATCH, NORMAL = "batch", "normal"
CHOICES = (BATCH, NORMAL)
# The loop goes under batch once the app-server writes ENTER_BYTES within ENTER_WINDOW (~3 MiB/s,
# reached within a few milliseconds of a flood: the stream's start is relayed under batch too),
# and stays while it writes STAY_RATE over each WINDOW; below that, back to the normal policy.
ENTER_BYTES = 64 << 10
ENTER_WINDOW = 0.02
STAY_RATE = 1 << 20  # bytes per second
WINDOW = 0.25  # seconds

_POLICY_NAMES = {getattr(os, name): name[6:].lower()
                 for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
                 if hasattr(os, name)}
_may_switch = False  # `serve` asked for batch, and started under the normal policy (see ``prepare``)
_switched = False  # the event loop's thread is under batch now


class SchedulingError(Exception):
    """A policy name that is none of CHOICES."""


def choice(flag: str | None, environ: Mapping[str, str]) -> str:
    """The policy asked for: the flag, else the variable, else batch. SchedulingError for a
    variable that is none of CHOICES (argparse checks the flag)."""
    try:
        return setting(flag, environ, CPU_SCHEDULING_ENV, CHOICES, BATCH)
    except ValueError as exc:
        raise SchedulingError(str(exc)) from None


def policy_name(policy: int) -> str:
    """``batch``, ``other``, ``idle``... for a policy number (a SCHED_RESET_ON_FORK flag ignored)."""
    reset_on_fork = getattr(os, "SCHED_RESET_ON_FORK", 0)
    return _POLICY_NAMES.get(policy & ~reset_on_fork, str(policy))


def prepare(asked: str) -> str:
    """Called by `serve` (in the thread that runs the event loop) before the loop starts: whether
    the loop may switch to batch while the app-server streams, said for the log."""
    global _may_switch
    if not hasattr(os, "sched_getscheduler") or not hasattr(os, "SCHED_BATCH"):
        return "as started (this platform has no scheduling policies)"
    started = os.sched_getscheduler(0)
    if asked == NORMAL:
        return f"as started ({policy_name(started)})"
    if started != os.SCHED_OTHER:
        return f"as started ({policy_name(started)}, which batch does not replace)"
    _may_switch = True
    return "batch while the app-server streams, else other; the app-server always other"


def _switch(batch: bool) -> bool:
    """Puts this thread under batch or back under the normal policy; False where refused."""
    global _switched
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH if batch else os.SCHED_OTHER, os.sched_param(0))
    except OSError as exc:
        log.warning("cpu scheduling: %s refused (%s)", "batch" if batch else "other", exc.strerror)
        return False
    _switched = batch
    return True


def child_policy() -> int | None:
    """The policy a child spawned now must be put back under (the normal one, while the
    thread is under batch), or None."""
    return os.SCHED_OTHER if _switched else None


def restore_in_child(policy: int | None) -> None:
    """In a forked child before exec: back under ``policy`` (from ``child_policy``), if any.
    Going from batch back to the normal policy is never refused; were it, the child runs on
    under batch, which only takes its wake-up preemption."""
    if policy is not None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            pass


class StreamPacer:
    """Counts the app-server's output (``saw``) on the event loop's thread and puts that thread
    under batch once ENTER_BYTES come within ENTER_WINDOW, and back under the normal policy at
    the end of the first WINDOW below STAY_RATE. Inert unless `serve` prepared a switch
    (``prepare``), or when ``enabled`` is False. ``switches`` counts the changes."""

    def __init__(self, loop: _Loop, enabled: bool | None = None,
                 switch: Callable[[bool], bool] = _switch):
        self._loop = loop
        self.enabled = _may_switch if enabled is None else enabled
        self._switch = switch
        self.batch = False
        self.switches = 0
        self._since = loop.time()
        self._bytes = 0
        self._timer: _Timer | None = None
        self._budget = STAY_RATE * WINDOW

    def saw(self, n: int) -> None:
        """``n`` bytes of the app-server's output were read."""
        if not self.enabled:
            return
        self._bytes += n
        if self.batch or self._bytes < ENTER_BYTES:
            return
        now = self._loop.time()
        if now - self._since > ENTER_WINDOW:  # that much, but over a longer time: a new window from now
            self._since, self._bytes = now, 0
            return
        if self._switch(True):
            self.batch = True
            self.switches += 1
            log.debug("cpu scheduling: batch (the app-server streams)")
        else:
            self.enabled = False
            return
        self._bytes = 0
        self._timer = self._loop.call_later(WINDOW, self._check)

    def _check(self) -> None:
        if self._bytes >= self._budget:  # still streaming
            self._bytes = 0
            self._timer = self._loop.call_later(WINDOW, self._check)
            return
        self._timer = None
        self._back()

    def _back(self) -> None:
        if self._switch(False):
            self.switches += 1
            log.debug("cpu scheduling: other (the stream stopped)")
        else:
            self.enabled = False
        self.batch = False
        self._since, self._bytes = self._loop.time(), 0

    def close(self) -> None:
        """Back under the normal policy, if under batch; inert from now on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.batch:
            self._back()
        self.enabled = False
