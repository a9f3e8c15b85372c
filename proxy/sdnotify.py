"""systemd's notify protocol (Type=notify, WatchdogSec): datagrams of ``KEY=VALUE`` lines to the
AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an abstract name written ``@name``).

Without $NOTIFY_SOCKET every call is a no-op, so the broker calls it unconditionally. A send
never blocks and never raises (a full or vanished socket only loses that datagram: systemd
then sees the next one). The watchdog is on when $WATCHDOG_USEC is a positive number and
$WATCHDOG_PID, when set, names this process; pings are due every half of it.

The variables are systemd's message to the broker alone: ``child_environment`` removes them
from the app-server's environment (codex must not ping, nor be taken for the service)."""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables systemd meant for the broker."""
    return {k: v for k, v in env.items() if k not in NOTIFY_VARIABLES}


def socket_address(value: str) -> str | bytes | None:
    """The address to send to: a path as is, ``@name`` as the abstract b"\\0name"; None when unusable."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when the watchdog is not
    asked of this process."""
    owner = env.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def status_text(sessions: int, turns: int, state: str) -> str:
    return f"{state.lower()}: {sessions} sessions, {turns} turns in flight"


class Notifier:
    """Sends notify datagrams; built from the broker's environment at its start."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None):
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog = watchdog_interval(env, pid) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``lines``; False when it could not be sent (or notify is off)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS=, only when it changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def ping(self) -> None:
        if self.watchdog is not None:
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
