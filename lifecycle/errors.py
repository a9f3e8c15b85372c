"""Exceptions of the broker client, rooted at one :class:`BrokerError`.

Two branches, so a caller can tell "the app-server said no" from "our machinery failed":
:class:`UpstreamError` for the app-server side, everything else for our own. Each class carries
the CLI exit code it maps to, so the CLI turns an exception into a status in exactly one place.
Codes follow grpc_health_probe where they overlap: 2 cannot connect, 3 RPC failed.

A gRPC status becomes one of these in one place, ``lifecycle.client.rpc_error``: UNAVAILABLE is
:class:`ConnectError` (2), DEADLINE_EXCEEDED a timeout (:class:`HealthTimeout` or
:class:`CallTimeout`, 3), every other code :class:`RpcFailed` (3).
"""

from __future__ import annotations

import signal
from typing import Any, ClassVar


class BrokerError(Exception):
    """Root of every expected failure; anything else escaping is a bug."""

    exit_code: ClassVar[int] = 1


# --- upstream: the app-server answered badly or went away -------------------------------------


class UpstreamError(BrokerError):
    """The app-server side failed; the broker itself did its job."""

    exit_code = 3


class AppServerError(UpstreamError):
    """A JSON-RPC error response, kept whole so callers can branch on the code."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"app-server error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def from_error(cls, error: dict[str, Any]) -> AppServerError:
        """Build from the ``error`` member of a JSON-RPC response, tolerating odd shapes."""
        code = error.get("code")
        return cls(
            code if isinstance(code, int) else -32603, str(error.get("message", "")), error.get("data")
        )


class AppServerExited(UpstreamError):
    """The app-server process died; names its exit status so nobody has to dig in logs."""

    def __init__(self, returncode: int | None, detail: str = "") -> None:
        super().__init__(_describe_exit(returncode) + (f": {detail}" if detail else ""))
        self.returncode = returncode


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "app-server exited (status unknown)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"app-server killed by {name}"
    return f"app-server exited with status {returncode}"


# --- ours: starting, reaching or managing the broker -------------------------------------------


class SpawnError(BrokerError):
    """The broker did not start; the message carries the cause and the log tail to act on."""

    def __init__(self, cause: str, log_tail: str = "", log_file: str | None = None) -> None:
        text = f"broker failed to start: {cause}"
        if log_tail.strip():
            where = f" of {log_file}" if log_file else ""
            text += f"\n--- last lines{where} ---\n{log_tail.rstrip()}"
        super().__init__(text)
        self.cause = cause
        self.log_tail = log_tail
        self.log_file = log_file


class SpawnTimeout(SpawnError):
    """The broker did not report SERVING within the spawn deadline."""


class HealthTimeout(BrokerError):
    """A Health check got no answer in time (the RPC phase, not the connect phase)."""

    exit_code = 3


class ConnectError(BrokerError):
    """Cannot connect to the broker's endpoint at all."""

    exit_code = 2


class CallTimeout(BrokerError):
    """A Call or Session request outlived its deadline."""

    exit_code = 3


class RpcFailed(BrokerError):
    """The broker was reached, but the RPC ended with an error status (UNAUTHENTICATED,
    INTERNAL, RESOURCE_EXHAUSTED, UNIMPLEMENTED, ...): an RPC failure, never "cannot connect".
    ``code`` is the gRPC status code's name."""

    exit_code = 3

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class SessionClosed(BrokerError):
    """A Session or turn watcher lost its broker; raised so watchers never hang."""


class StateError(BrokerError):
    """The state directory is unusable (not a directory, wrong owner, unreadable)."""


class IdentityError(BrokerError):
    """Refusing to signal a pid whose identity (pid + create time) is not verified."""


class DrainTimeout(BrokerError):
    """A draining broker did not exit within the time we were willing to wait."""


class UsageError(BrokerError):
    """Bad CLI input or configuration (e.g. an unparsable environment variable)."""

    exit_code = 2
