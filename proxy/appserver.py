"""The app-server subprocess: spawn it in its own process group with a parent-death signal,
split its stdout into lines, pass its stderr to the broker's log (rate-limited) while keeping
a tail, write to its stdin, and stop it with escalation (close stdin, SIGTERM, SIGKILL; the
whole group).

The child is a plain ``subprocess.Popen`` (see ``proxy.child``; `serve` spawns it before the
broker's heavy imports) whose pipes are attached to the event loop here. Reading is a protocol
rather than a StreamReader: every chunk is split and handed to the hub synchronously, so a
burst of notifications costs no await per line. The exit is watched on a pidfd.

The app-server is gone when it has exited or when it has closed its stdout (nothing it could
still do would reach anyone): ``wait_gone`` returns on whichever comes first, then waits a
moment for the other, so the reason names the exit status when there is one."""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from proxy import child as child_process

log = logging.getLogger("codex_broker.proxy")

STDERR_TAIL_LINES = 40
STDERR_LINE_MAX = 4096  # characters of one stderr line that reach the log
STDERR_RATE = 50.0  # stderr lines per second that reach the log, on average ...
STDERR_BURST = 200  # ... with bursts up to this many; the rest are counted and summarized
STDERR_SUMMARY_EVERY = 5.0  # seconds between summaries of dropped lines while they are dropped
STDOUT_AFTER_EXIT = 1.0  # after the exit, how long the rest of stdout may take (a descendant may hold it)
EXIT_AFTER_EOF = 0.5  # after stdout closed, how long to wait for the exit (for its status)


class RateLimit:
    """A token bucket: ``take(now, n)`` grants at most ``burst`` events at once and ``rate``
    per second on average; refused events are counted until ``take_dropped``."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None
        self.dropped = 0

    def take(self, now: float, n: int) -> int:
        """How many of ``n`` events may go now (the first ones); the rest count as dropped."""
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        granted = min(n, int(self._tokens))
        self._tokens -= granted
        self.dropped += n - granted
        return granted

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


class LineSplitter:
    """Splits a byte stream into lines, handed on a chunk's worth at a time: ``on_chunk`` gets
    the complete lines a chunk of the stream finished, in order, joined by newlines (no final
    one), so a run of notifications can be relayed without being cut apart and put back
    together; blank lines may be among them. A line longer than ``max_line`` is never handed
    on: ``on_oversized`` gets its length, and it is dropped as it arrives."""

    def __init__(self, on_chunk: Callable[[bytes], None], on_oversized: Callable[[int], None],
                 max_line: int):
        self._on_chunk = on_chunk
        self._on_oversized = on_oversized
        self._max = max_line
        self._buf = bytearray()
        self._skipping = 0  # > 0: inside an oversized line, bytes dropped so far

    def feed(self, data: bytes) -> None:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                self._skipping += len(data)
                return
            self._on_oversized(self._skipping + end)
            self._skipping = 0
            data = data[end + 1:]
        last = data.rfind(b"\n")
        if last < 0:
            self._buf += data
            self._check_overflow()
            return
        if self._buf:
            self._buf += memoryview(data)[:last]
            body = bytes(self._buf)
            self._buf.clear()
        else:
            body = data[:last]
        self._buf += memoryview(data)[last + 1:]
        if len(body) <= self._max:  # no line of it can be over the limit
            if body and not body.isspace():
                self._on_chunk(body)
        else:
            for line in body.split(b"\n"):
                if len(line) > self._max:
                    self._on_oversized(len(line))
                elif line.strip():
                    self._on_chunk(line)
        self._check_overflow()

    def _check_overflow(self) -> None:
        if len(self._buf) > self._max:
            self._skipping = len(self._buf)
            self._buf.clear()


def _stderr_text(raw: bytes | bytearray) -> str:
    line = raw[:STDERR_LINE_MAX * 4].decode("utf-8", "replace").rstrip()
    return f"{line[:STDERR_LINE_MAX]}... ({len(raw)} bytes)" if len(line) > STDERR_LINE_MAX else line


class _ReadSide(asyncio.Protocol):
    """stdout (fd 1) or stderr (fd 2) of the child."""

    def __init__(self, child: AppServerProcess, fd: int):
        self.child = child
        self.fd = fd

    def data_received(self, data: bytes) -> None:
        if self.fd == 1:
            self.child._stdout.feed(data)
        else:
            self.child._on_stderr(data)

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fd == 1:
            self.child._stdout_closed.set()


class _WriteSide(asyncio.BaseProtocol):
    """stdin of the child: the hub watches the transport's buffer size, no flow control here."""


class AppServerProcess:
    """One app-server child. ``on_chunk`` gets its stdout a run of complete lines at a time (see LineSplitter)."""

    def __init__(self, argv: Sequence[str], *, cwd: str | None, env: dict[str, str] | None,
                 on_chunk: Callable[[bytes], None], max_line: int):
        self.argv = list(argv)
        self.cwd = cwd
        self.env = env
        self._stdout = LineSplitter(on_chunk, self._on_oversized, max_line)
        self._stderr_buf = bytearray()
        self._stderr_limit = RateLimit(STDERR_RATE, STDERR_BURST)
        self._stderr_summary: asyncio.TimerHandle | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stdout_closed = asyncio.Event()
        self._exited = asyncio.Event()
        self._popen: subprocess.Popen[bytes] | None = None
        self._pipes: list[asyncio.BaseTransport] = []
        self._stdin: asyncio.WriteTransport | None = None
        self.pid: int | None = None
        self.stdin_closed = False

    async def start(self, child: subprocess.Popen[bytes] | None = None) -> None:
        """Takes over ``child`` (from ``proxy.child.spawn``), or spawns one: ConfigError when the
        command cannot run. On any failure here the child is killed."""
        if child is None:
            child = child_process.spawn(self.argv, cwd=self.cwd, env=self.env)
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        self._popen, self.pid = child, child.pid
        loop = asyncio.get_running_loop()
        try:
            stdin, _ = await loop.connect_write_pipe(_WriteSide, child.stdin)
            self._stdin = stdin
            self._pipes.append(stdin)
            for fd, pipe in ((1, child.stdout), (2, child.stderr)):
                transport, _ = await loop.connect_read_pipe(functools.partial(_ReadSide, self, fd), pipe)
                self._pipes.append(transport)
            self._watch_exit(loop, child)
        except BaseException:
            for pipe_transport in self._pipes:
                pipe_transport.close()
            child_process.kill(child)
            self._exited.set()
            raise

    def _watch_exit(self, loop: asyncio.AbstractEventLoop, child: subprocess.Popen[bytes]) -> None:
        """``_exited`` is set once the child has exited and is reaped: a pidfd becomes readable
        on exit; where there is none (kernel older than 5.3), a thread waits."""
        try:
            pidfd = os.pidfd_open(child.pid)
        except (AttributeError, OSError):
            def wait() -> None:
                child.wait()
                loop.call_soon_threadsafe(self._exited.set)

            threading.Thread(target=wait, name="app-server-wait", daemon=True).start()
            return

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            child.wait()  # it has exited: reaps at once
            self._exited.set()

        loop.add_reader(pidfd, exited)

    # -- output of the child -------------------------------------------------------------
    def _on_oversized(self, size: int) -> None:
        log.warning("app-server line skipped: %d bytes exceeds the line limit", size)

    def _on_stderr(self, data: bytes) -> None:
        """The last lines make the tail (for the exit's description); the log gets the lines
        the rate limit grants, each cut to STDERR_LINE_MAX characters. Lines beyond the limit
        are only counted (no decoding), so a flood costs the broker little more than reading."""
        self._stderr_buf += data
        *raw_lines, rest = self._stderr_buf.split(b"\n")
        self._stderr_buf = bytearray(rest[-65536:])
        lines = [raw for raw in raw_lines if raw.strip()]
        if not lines:
            return
        self.stderr_tail.extend(_stderr_text(raw) for raw in lines[-STDERR_TAIL_LINES:])
        granted = self._stderr_limit.take(time.monotonic(), len(lines))
        for raw in lines[:granted]:
            text = _stderr_text(raw)
            log.info("app-server: %s", text, extra={"event": "app-server stderr", "fields": {"line": text}})
        if granted < len(lines) and self._stderr_summary is None:
            self._stderr_summary = asyncio.get_running_loop().call_later(STDERR_SUMMARY_EVERY,
                                                                         self._summarize_dropped)

    def _summarize_dropped(self) -> None:
        self._stderr_summary = None
        dropped = self._stderr_limit.take_dropped()
        if dropped:
            log.warning("app-server: %d stderr lines not logged (more than %g lines/s)", dropped, STDERR_RATE,
                        extra={"event": "app-server stderr lines dropped",
                               "fields": {"lines": dropped, "rate_limit": STDERR_RATE}})

    # -- input to the child --------------------------------------------------------------
    def write_buffer_size(self) -> int:
        return self._stdin.get_write_buffer_size() if self._stdin else 0

    def send(self, line: bytes) -> None:
        stdin = self._stdin
        if stdin is None or self.stdin_closed:
            raise BrokenPipeError("app-server stdin is closed")
        if stdin.is_closing():
            return  # the app-server closed its end (it is exiting): lost, as in a broken pipe; wait_gone tells
        if len(line) < 1 << 16:
            stdin.write(line + b"\n")
        else:  # a big message: no copy of it just to add the newline
            stdin.write(line)
            stdin.write(b"\n")

    # -- state ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._popen is not None and not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None and self._exited.is_set() else None

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None and self.stdout_closed:
            status = f"closed its stdout (pid {self.pid} still running)"
        elif code is None:
            status = "is still running"
        elif code < 0:
            try:
                status = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                status = f"was killed by signal {-code}"
        else:
            status = f"exited with status {code}"
        tail = " | ".join(list(self.stderr_tail)[-5:])
        return f"app-server {status}" + (f"; stderr: {tail}" if tail else "")

    @property
    def stdout_closed(self) -> bool:
        return self._stdout_closed.is_set()

    async def wait_gone(self) -> int | None:
        """Waits until the child can no longer answer: it has exited (then the rest of its
        stdout is read, for at most STDOUT_AFTER_EXIT: a descendant may hold the pipe open),
        or it has closed its stdout (then its exit is awaited for at most EXIT_AFTER_EOF).
        Returns the exit status, None while it still runs."""
        exited = asyncio.ensure_future(self._exited.wait())
        closed = asyncio.ensure_future(self._stdout_closed.wait())
        try:
            done, _ = await asyncio.wait([exited, closed], return_when=asyncio.FIRST_COMPLETED)
            rest, grace = (closed, STDOUT_AFTER_EXIT) if exited in done else (exited, EXIT_AFTER_EOF)
            await asyncio.wait([rest], timeout=grace)
        finally:
            exited.cancel()
            closed.cancel()
        return self.returncode

    # -- stopping ------------------------------------------------------------------------
    def close_stdin(self) -> None:
        if self._stdin is not None and not self.stdin_closed:
            self.stdin_closed = True
            self._stdin.close()

    def signal_group(self, sig: int) -> None:
        """Signals the child's whole process group (it leads its own session)."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, *, polite_wait: float = 2.0, term_wait: float = 2.0) -> int | None:
        """Close stdin, wait; SIGTERM the group, wait; SIGKILL the group; always reap."""
        if self._popen is None:
            return None
        self.close_stdin()
        for sig, wait in ((signal.SIGTERM, polite_wait), (signal.SIGKILL, term_wait)):
            try:
                await asyncio.wait_for(self._exited.wait(), wait)
                break
            except TimeoutError:
                log.warning("app-server did not exit; sending %s to its process group", signal.Signals(sig).name)
                self.signal_group(sig)
        else:
            await self._exited.wait()
        # Whatever the group still holds (a native server behind a launcher) goes too.
        self.signal_group(signal.SIGKILL)
        try:
            await asyncio.wait_for(self._stdout_closed.wait(), 1.0)
        except TimeoutError:
            pass
        for pipe_transport in self._pipes:
            pipe_transport.close()
        if self._stderr_summary is not None:
            self._stderr_summary.cancel()
            self._summarize_dropped()
        return self.returncode
