"""The ensure/rotate decision (DESIGN.md section 5) as a pure function.

Observing a broker takes I/O (read the record, check the pid, ask Status and Health); deciding
what to do about it does not. Keeping :func:`decide` free of I/O and of clock reads (the
observation carries ``now``, and how long and how often the broker was tried) lets every row of
the table be tested without a process, and lets the acting layer stay a thin loop over the
resulting :class:`Decision`.

Two rules keep a busy broker alive. "Wedged" needs proof: no answer of any kind across at least
:data:`MIN_ATTEMPTS` attempts over :data:`WEDGE_WINDOW` seconds (the broker's hang threshold plus
a margin); an answer, however late, counts as alive, and a shorter silence is never a reason to
signal. "Unhealthy" (it answered, but not SERVING) is never killed: it is asked to drain without
force, so a passing stall keeps its turns and a really wedged app-server ends the broker by the
broker's own rule.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from lifecycle.errors import UsageError
from proxy import contract
from proxy.contract import resolve_codex_home  # noqa: F401 (one rule, re-exported for callers)

DEFAULT_MAX_AGE_HOURS = contract.DEFAULT_MAX_AGE_HOURS
MAX_AGE_ENV = contract.MAX_AGE_ENV
HANG_THRESHOLD = 3.0  # the broker's own rule (serve --probe-timeout default): silence this long is a hang
WEDGE_MARGIN = 1.0
WEDGE_WINDOW = HANG_THRESHOLD + WEDGE_MARGIN  # silence needed before a broker counts as wedged
MIN_ATTEMPTS = 2  # ... across at least this many attempts
DEFAULT_SPAWN_DEADLINE = contract.SPAWN_TIMEOUT


class Verdict(enum.Enum):
    """What the observed broker is, one value per row of the table."""

    NONE = "none"
    DEAD = "dead"
    FOREIGN = "foreign"
    STARTING = "starting"
    WEDGED = "wedged"
    SILENT = "silent"
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
    health: str | None  # SERVING, NOT_SERVING; None when it did not answer
    started_at: float  # the broker's start (a starting record: when its spawn began)
    now: float
    max_age_seconds: float  # the caller's setting: what a broker it spawns gets
    record_app_server_command: tuple[str, ...]
    wanted_app_server_command: tuple[str, ...]
    record_codex_home: str
    wanted_codex_home: str
    record_starting: bool = False  # recorded by a spawn that never marked it ready
    spawn_deadline_seconds: float = DEFAULT_SPAWN_DEADLINE
    silent_seconds: float = 0.0  # how long it was tried with no answer of any kind (0: it answered)
    probe_attempts: int = 0  # how many attempts that silence spans
    wedge_window_seconds: float = WEDGE_WINDOW
    # The broker's own max age (Status), else the record's; None for a broker too old to say.
    broker_max_age_seconds: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to do. ``signal_allowed`` is True only when identity is verified; the acting layer
    must still re-verify (``identity.signal_verified``) right before any signal."""

    verdict: Verdict
    reuse: bool = False  # hand the recorded broker to the caller
    spawn: bool = False  # start a new broker now (never wait for the old one's turns)
    drain: bool = False  # Drain without force, with the broker's default deadline; it exits by itself
    kill: bool = False  # SIGKILL the broker's and the app-server's groups, each re-verified
    clean_files: bool = False  # remove the record (if still ours) and the session dir
    wait_ready: float = 0.0  # seconds to wait for the recorded broker to be SERVING, then decide again
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
    silent = not obs.status_answered and obs.health is None
    if obs.record_starting and obs.health != "SERVING" and obs.broker_state not in ("DRAINING", "STOPPING"):
        starting = _starting(obs, silent)
        if starting is not None:
            return starting
    if silent:
        return _silent(obs)
    if obs.broker_state in ("DRAINING", "STOPPING"):
        reason = f"draining: broker is {obs.broker_state}; leaving it to finish its turns"
        return Decision(Verdict.DRAINING, spawn=True, reason=reason, signal_allowed=True)
    if obs.health != "SERVING":
        answer = obs.health if obs.health is not None else "nothing (Status answered)"
        reason = f"unhealthy: Health answered {answer}; asked to drain without force"
        return Decision(Verdict.UNHEALTHY, spawn=True, drain=True, reason=reason, signal_allowed=True)
    if _is_aged(obs):
        age, limit = _hours(obs.now - obs.started_at), _hours(applied_max_age(obs))
        reason = f"aged: started {age} ago, max age {limit}"
        return Decision(Verdict.AGED, spawn=True, drain=True, reason=reason, signal_allowed=True)
    mismatch = _mismatch(obs)
    if mismatch:
        return Decision(
            Verdict.MISMATCHED, spawn=True, drain=True, reason=f"mismatched: {mismatch}", signal_allowed=True
        )
    reason = f"live: SERVING, started {_hours(obs.now - obs.started_at)} ago"
    return Decision(Verdict.LIVE, reuse=True, reason=reason, signal_allowed=True)


def _starting(obs: Observation, silent: bool) -> Decision | None:
    """A record its spawn never marked ready (that ensure was killed mid-spawn), not SERVING:
    within the spawn deadline, wait for SERVING as the spawn would have; past it, wedged if it
    answers (a silent one needs the same proof as any other); None: judge it by the other rows."""
    age = obs.now - obs.started_at
    if age < obs.spawn_deadline_seconds:
        remaining = obs.spawn_deadline_seconds - max(age, 0.0)
        reason = f"starting: spawned {age:.1f} s ago, not SERVING yet; waiting up to {remaining:.1f} s"
        return Decision(Verdict.STARTING, wait_ready=remaining, reason=reason, signal_allowed=True)
    if silent:
        return None
    reason = f"wedged: still not SERVING {age:.1f} s after its spawn (deadline {obs.spawn_deadline_seconds:g} s)"
    return Decision(Verdict.WEDGED, spawn=True, kill=True, clean_files=True, reason=reason, signal_allowed=True)


def _silent(obs: Observation) -> Decision:
    """Nothing answered. Wedged only with proof: silence across several attempts over the wedge
    window; a shorter silence is not a reason to signal (the broker may just be busy)."""
    tried = f"no answer in {obs.silent_seconds:.1f} s over {obs.probe_attempts} attempts"
    if obs.silent_seconds >= obs.wedge_window_seconds and obs.probe_attempts >= MIN_ATTEMPTS:
        return Decision(Verdict.WEDGED, spawn=True, kill=True, clean_files=True, reason=f"wedged: {tried}",
                        signal_allowed=True)
    reason = f"silent: {tried}, short of the {obs.wedge_window_seconds:g} s wedge window; not signalled"
    return Decision(Verdict.SILENT, spawn=True, reason=reason, signal_allowed=True)


def applied_max_age(obs: Observation) -> float:
    """The max age a broker is judged by: its own (it was spawned with it, and drains itself at
    it), so a caller's environment never rotates a broker spawned under another; the caller's
    setting only for a broker that does not say."""
    return obs.max_age_seconds if obs.broker_max_age_seconds is None else obs.broker_max_age_seconds


def _is_aged(obs: Observation) -> bool:
    """Strictly older than its max age; a max age <= 0 disables aging."""
    limit = applied_max_age(obs)
    return limit > 0 and obs.now - obs.started_at > limit


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
    """Max broker age in seconds by the contract's rule (CODEX_BROKER_MAX_AGE_HOURS, then the
    companion's variable, then 6 hours; 0 = never); anything unparsable is a usage error."""
    try:
        return contract.max_age_hours(None, env) * 3600.0
    except contract.MaxAgeError as exc:
        raise UsageError(str(exc)) from None
