"""The event loop `serve` runs on.

``auto`` by default: uvloop (libuv) where it is installed, which it is on Linux and macOS (a
dependency there), else asyncio's own loop. ``serve --event-loop asyncio|uvloop|auto`` or the
same in CODEX_BROKER_EVENT_LOOP chooses. On uvloop the loop's own work for each read and write
is C, which is most of what the broker spends on a small request besides the system calls (a
JSON-lines round trip costs the broker about 30 us less CPU; see docs/BENCHMARKS.md). The
broker runs the same on either: it uses only what both loops provide, with the differences
handled where they arise (uvloop keeps SIGCHLD for itself: the orphan reaper then uses a plain
signal handler, see proxy.broker; uvloop raises on a write to a closed pipe, where asyncio
drops it: proxy.appserver drops it first). The tests that touch those run on both loops."""
from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # `serve` asks for its choice before the spawn, where asyncio is not loaded yet
    import asyncio

EVENT_LOOP_ENV = "CODEX_BROKER_EVENT_LOOP"
AUTO, UVLOOP, ASYNCIO = "auto", "uvloop", "asyncio"
CHOICES = (AUTO, UVLOOP, ASYNCIO)

T = TypeVar("T")


class EventLoopError(Exception):
    """An event loop that cannot be had (a bad name, or uvloop asked for and missing)."""


def choice(flag: str | None, environ: Mapping[str, str]) -> str:
    """The loop asked for: the flag, else the variable, else auto. EventLoopError for a name
    that is none of CHOICES."""
    value = flag if flag else (environ.get(EVENT_LOOP_ENV) or AUTO)
    value = value.strip().lower()
    if value not in CHOICES:
        source = "--event-loop" if flag else EVENT_LOOP_ENV
        raise EventLoopError(f"{source} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def factory(asked: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(the loop's name with its version, a factory of new loops) for ``asked``."""
    import asyncio

    if asked != ASYNCIO:
        try:
            import uvloop
        except ImportError:
            if asked == UVLOOP:
                raise EventLoopError("--event-loop uvloop: uvloop is not installed") from None
        else:
            return f"uvloop {uvloop.__version__}", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> T:
    """``asyncio.run`` on a loop from ``loop_factory``."""
    import asyncio

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)
