"""The ensure/rotate decision (DESIGN.md section 5) as a pure function.

Observing a broker takes I/O (read the record, check the pid, ask Status and Health); deciding
what to do about it does not. Keeping :func:`decide` free of I/O and of clock reads (the
observation carries ``now``) lets every row of the table be tested without a process, and lets
the acting layer stay a thin loop over the resulting :class:`Decision`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from lifecycle.errors import UsageError
from proxy.contract import resolve_codex_home  # noqa: F401 (one rule, re-exported for callers)

DEFAULT_MAX_AGE_HOURS = 6.0
MAX_AGE_ENV = ("CODEX_BROKER_MAX_AGE_HOURS", "CODEX_COMPANION_BROKER_MAX_AGE_HOURS")


class Verdict(enum.Enum):
    """What the observed broker is, one value per row of the table."""

    NONE = "none"
    DEAD = "dead"
    FOREIGN = "foreign"
    WEDGED = "wedged"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    AGED = "aged"
    MISMATCHED = "mismatched"
    LIVE = "live"


@dataclass(frozen=True)
class Observation:
    """Everything ensure learned about the recorded broker, gathered before deciding."""

    record_present: bool
    record_corrupt: bool
    pid_alive: bool
    create_time_matches: bool  # and its command line names the recorded instance id
    status_answered: bool
    status_instance_id: str | None
    record_instance_id: str | None
    broker_state: str | None  # STARTING, SERVING, DRAINING, STOPPING; None if Status did not answer
    health: str | None  # SERVING, NOT_SERVING; None when unreachable or timed out
    started_at: float
    now: float
    max_age_seconds: float
    record_app_server_command: tuple[str, ...]
    wanted_app_server_command: tuple[str, ...]
    record_codex_home: str
    wanted_codex_home: str


@dataclass(frozen=True)
class Decision:
    """What to do. ``signal_allowed`` is True only when identity is verified; the acting layer
    must still re-verify (``identity.signal_verified``) right before any signal."""

    verdict: Verdict
    reuse: bool = False  # hand the recorded broker to the caller
    spawn: bool = False  # start a new broker now (never wait for the old one's turns)
    drain: bool = False  # Drain with the broker's default deadline; it exits by itself
    force_drain: bool = False  # Drain(force); if it has not exited within seconds, act as `kill`
    kill: bool = False  # SIGKILL the broker's and the app-server's groups, each re-verified
    clean_files: bool = False  # remove the record (if still ours) and the session dir
    signal_allowed: bool = False
    reason: str = ""  # one line for logs and the rotation history


def decide(obs: Observation) -> Decision:
    """Apply the table top to bottom; the first matching row wins."""
    if not obs.record_present or obs.record_corrupt:
        return _no_broker(obs)
    if not obs.pid_alive or not obs.create_time_matches:
        return _dead(obs)
    if obs.status_answered and obs.status_instance_id != obs.record_instance_id:
        reason = f"foreign: Status answered {obs.status_instance_id}, record names {obs.record_instance_id}"
        return Decision(Verdict.FOREIGN, spawn=True, reason=reason)
    return _verified(obs)


def _no_broker(obs: Observation) -> Decision:
    reason = "none: broker record was corrupt" if obs.record_corrupt else "none: no broker record"
    return Decision(Verdict.NONE, spawn=True, reason=reason)


def _dead(obs: Observation) -> Decision:
    """Never signal here: the pid is gone, or it now belongs to someone else."""
    if obs.pid_alive:
        reason = "dead: recorded pid is alive but was recycled (another create time, or not this broker's command)"
    else:
        reason = "dead: recorded pid is gone"
    return Decision(Verdict.DEAD, spawn=True, clean_files=True, reason=reason)


def _verified(obs: Observation) -> Decision:
    """Rows where identity is verified by pid + create time (and instance id, when Status answered)."""
    if obs.health is None:
        reason = "wedged: Health unreachable or timed out" + (
            "" if obs.status_answered else " (Status did not answer either)"
        )
        return Decision(
            Verdict.WEDGED, spawn=True, kill=True, clean_files=True, reason=reason, signal_allowed=True
        )
    if obs.broker_state in ("DRAINING", "STOPPING"):
        reason = f"draining: broker is {obs.broker_state}; leaving it to finish its turns"
        return Decision(Verdict.DRAINING, spawn=True, reason=reason, signal_allowed=True)
    if obs.health != "SERVING":
        reason = f"unhealthy: Health answered {obs.health}"
        return Decision(Verdict.UNHEALTHY, spawn=True, force_drain=True, reason=reason, signal_allowed=True)
    if _is_aged(obs):
        age, limit = _hours(obs.now - obs.started_at), _hours(obs.max_age_seconds)
        reason = f"aged: started {age} ago, max age {limit}"
        return Decision(Verdict.AGED, spawn=True, drain=True, reason=reason, signal_allowed=True)
    mismatch = _mismatch(obs)
    if mismatch:
        return Decision(
            Verdict.MISMATCHED, spawn=True, drain=True, reason=f"mismatched: {mismatch}", signal_allowed=True
        )
    reason = f"live: SERVING, started {_hours(obs.now - obs.started_at)} ago"
    return Decision(Verdict.LIVE, reuse=True, reason=reason, signal_allowed=True)


def _is_aged(obs: Observation) -> bool:
    """Strictly older than max age; a max age <= 0 disables aging."""
    return obs.max_age_seconds > 0 and obs.now - obs.started_at > obs.max_age_seconds


def _mismatch(obs: Observation) -> str:
    """Why this broker does not fit the caller's configuration, or '' when it does."""
    if tuple(obs.record_app_server_command) != tuple(obs.wanted_app_server_command):
        return (
            f"app-server command differs (broker {list(obs.record_app_server_command)}, "
            f"wanted {list(obs.wanted_app_server_command)})"
        )
    if obs.record_codex_home != obs.wanted_codex_home:
        return f"CODEX_HOME differs (broker {obs.record_codex_home}, wanted {obs.wanted_codex_home})"
    return ""


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


# --- configuration from the environment ---------------------------------------------------------


def max_age_seconds(env: Mapping[str, str]) -> float:
    """Max broker age in seconds: CODEX_BROKER_MAX_AGE_HOURS, then the companion's variable,
    then 6 hours. 0 means never age out; anything unparsable is a usage error, not a default."""
    for name in MAX_AGE_ENV:
        raw = env.get(name, "").strip()
        if raw:
            return _parse_hours(name, raw) * 3600.0
    return DEFAULT_MAX_AGE_HOURS * 3600.0


def _parse_hours(name: str, raw: str) -> float:
    try:
        hours = float(raw)
    except ValueError:
        hours = math.nan
    if not math.isfinite(hours) or hours < 0:
        raise UsageError(f"{name}={raw!r} is not a valid age: use a number of hours >= 0 (0 = never rotate)")
    return hours
