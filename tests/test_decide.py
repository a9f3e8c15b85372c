"""Every row of the ensure decision table, without a process in sight."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from lifecycle.decide import (
    HANG_THRESHOLD,
    MIN_ATTEMPTS,
    WEDGE_WINDOW,
    Decision,
    Observation,
    Verdict,
    decide,
    max_age_seconds,
    resolve_codex_home,
)
from lifecycle.errors import UsageError

HOUR = 3600.0
NOW = 1_800_000_000.0
CMD = ("codex", "app-server")


def observe(**changes: object) -> Observation:
    """A young, SERVING, identity-verified broker matching the caller; override what a test needs."""
    base = Observation(
        record_present=True,
        record_corrupt=False,
        pid_alive=True,
        create_time_matches=True,
        status_answered=True,
        status_instance_id="inst-1",
        record_instance_id="inst-1",
        broker_state="SERVING",
        health="SERVING",
        started_at=NOW - 1 * HOUR,
        now=NOW,
        max_age_seconds=6 * HOUR,
        record_app_server_command=CMD,
        wanted_app_server_command=CMD,
        record_codex_home="/home/u/.codex",
        wanted_codex_home="/home/u/.codex",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


SILENT = dict(status_answered=False, status_instance_id=None, broker_state=None, health=None)
PROVEN = dict(SILENT, silent_seconds=WEDGE_WINDOW, probe_attempts=MIN_ATTEMPTS)
STARTING = dict(record_starting=True, started_at=NOW - 5.0, spawn_deadline_seconds=30.0)
STARTING_OLD = dict(STARTING, started_at=NOW - 31.0)

ROWS = [
    pytest.param(dict(record_present=False), Verdict.NONE, id="no-record"),
    pytest.param(dict(record_corrupt=True), Verdict.NONE, id="corrupt-record"),
    pytest.param(dict(pid_alive=False, create_time_matches=False), Verdict.DEAD, id="pid-gone"),
    pytest.param(dict(create_time_matches=False), Verdict.DEAD, id="pid-recycled"),
    pytest.param(dict(status_instance_id="other"), Verdict.FOREIGN, id="foreign-instance"),
    pytest.param(dict(STARTING, **SILENT), Verdict.STARTING, id="starting-young-silent"),
    pytest.param(dict(STARTING, health="NOT_SERVING"), Verdict.STARTING, id="starting-young-not-serving"),
    pytest.param(dict(STARTING_OLD, health="NOT_SERVING"), Verdict.WEDGED, id="starting-past-deadline-not-serving"),
    pytest.param(dict(STARTING_OLD, **PROVEN), Verdict.WEDGED, id="starting-past-deadline-silent-proven"),
    pytest.param(dict(STARTING_OLD, **SILENT, silent_seconds=1.5, probe_attempts=1), Verdict.SILENT,
                 id="starting-past-deadline-silent-unproven"),
    pytest.param(dict(STARTING), Verdict.LIVE, id="starting-record-but-serving"),
    pytest.param(dict(STARTING, broker_state="DRAINING", health="NOT_SERVING"), Verdict.DRAINING,
                 id="starting-record-but-draining"),
    pytest.param(dict(PROVEN), Verdict.WEDGED, id="wedged-silent-over-window-and-attempts"),
    pytest.param(dict(PROVEN, silent_seconds=WEDGE_WINDOW * 10), Verdict.WEDGED, id="wedged-long-silence"),
    pytest.param(dict(SILENT, silent_seconds=2.0, probe_attempts=3), Verdict.SILENT,
                 id="silent-shorter-than-the-window"),
    pytest.param(dict(SILENT, silent_seconds=WEDGE_WINDOW, probe_attempts=1), Verdict.SILENT,
                 id="silent-one-attempt"),
    pytest.param(dict(SILENT), Verdict.SILENT, id="silent-never-tried"),
    pytest.param(dict(health=None), Verdict.UNHEALTHY, id="status-answered-health-did-not"),
    pytest.param(dict(broker_state="DRAINING", health="NOT_SERVING"), Verdict.DRAINING, id="draining"),
    pytest.param(dict(broker_state="STOPPING", health="NOT_SERVING"), Verdict.DRAINING, id="stopping"),
    pytest.param(dict(health="NOT_SERVING"), Verdict.UNHEALTHY, id="not-serving"),
    pytest.param(dict(started_at=NOW - 7 * HOUR), Verdict.AGED, id="aged"),
    pytest.param(dict(wanted_app_server_command=("my-server",)), Verdict.MISMATCHED, id="other-command"),
    pytest.param(dict(wanted_codex_home="/elsewhere/.codex"), Verdict.MISMATCHED, id="other-codex-home"),
    pytest.param({}, Verdict.LIVE, id="young-serving"),
    pytest.param(
        dict(status_answered=False, status_instance_id=None, broker_state=None),
        Verdict.LIVE,
        id="serving-status-silent-identity-by-pid",
    ),
]


@pytest.mark.parametrize(("changes", "verdict"), ROWS)
def test_each_row_of_the_table_gives_its_verdict(changes: dict[str, object], verdict: Verdict) -> None:
    decision = decide(observe(**changes))
    assert decision.verdict is verdict
    assert decision.reason.startswith(verdict.value + ":")


# The action columns, per verdict: (reuse, spawn, drain, kill, clean_files, waits, signal_allowed)
ACTIONS = {
    Verdict.NONE: (False, True, False, False, False, False, False),
    Verdict.DEAD: (False, True, False, False, True, False, False),
    Verdict.FOREIGN: (False, True, False, False, False, False, False),
    Verdict.STARTING: (False, False, False, False, False, True, True),
    Verdict.WEDGED: (False, True, False, True, True, False, True),
    Verdict.SILENT: (False, True, False, False, False, False, True),
    Verdict.DRAINING: (False, True, False, False, False, False, True),
    Verdict.UNHEALTHY: (False, True, True, False, False, False, True),
    Verdict.AGED: (False, True, True, False, False, False, True),
    Verdict.MISMATCHED: (False, True, True, False, False, False, True),
    Verdict.LIVE: (True, False, False, False, False, False, True),
}


def _actions(d: Decision) -> tuple[bool, ...]:
    return (d.reuse, d.spawn, d.drain, d.kill, d.clean_files, d.wait_ready > 0, d.signal_allowed)


@pytest.mark.parametrize(("changes", "verdict"), ROWS)
def test_each_verdict_carries_its_actions(changes: dict[str, object], verdict: Verdict) -> None:
    assert _actions(decide(observe(**changes))) == ACTIONS[verdict]


def test_only_a_wedged_broker_is_ever_killed() -> None:
    killed = {verdict for verdict, actions in ACTIONS.items() if actions[3]}
    assert killed == {Verdict.WEDGED}


@pytest.mark.parametrize("silence", [0.0, 1.9, 2.0, 3.0, WEDGE_WINDOW - 0.01])
def test_a_silence_shorter_than_the_wedge_window_is_never_killed(silence: float) -> None:
    """One slow answer (2 s under load) is not proof of a wedge, however many attempts it spans."""
    decision = decide(observe(**dict(SILENT, silent_seconds=silence, probe_attempts=5)))
    assert decision.verdict is Verdict.SILENT and not decision.kill and not decision.clean_files


def test_the_wedge_window_is_longer_than_the_brokers_hang_threshold() -> None:
    from proxy.config import ServeConfig

    hang = ServeConfig.__dataclass_fields__["probe_timeout"].default
    assert HANG_THRESHOLD == hang and WEDGE_WINDOW > hang and MIN_ATTEMPTS >= 2


def test_an_unhealthy_broker_is_drained_without_force_and_never_signalled() -> None:
    decision = decide(observe(health="NOT_SERVING"))
    assert decision.drain and not decision.kill and decision.spawn
    assert "without force" in decision.reason


def test_a_young_starting_record_is_waited_for_until_the_spawn_deadline() -> None:
    decision = decide(observe(**dict(STARTING, **SILENT)))
    assert decision.wait_ready == pytest.approx(25.0)
    assert not decision.spawn and not decision.kill
    at_deadline = decide(observe(**dict(STARTING, **SILENT, started_at=NOW - 30.0, silent_seconds=WEDGE_WINDOW,
                                        probe_attempts=3)))
    assert at_deadline.verdict is Verdict.WEDGED and "wedged: no answer" in at_deadline.reason


def test_a_starting_record_past_its_deadline_that_answers_names_the_deadline() -> None:
    decision = decide(observe(**dict(STARTING_OLD, health="NOT_SERVING")))
    assert decision.reason == "wedged: still not SERVING 31.0 s after its spawn (deadline 30 s)"


def test_recycled_pid_is_never_signalled_even_if_health_fails() -> None:
    decision = decide(observe(create_time_matches=False, **PROVEN))
    assert decision.verdict is Verdict.DEAD
    assert not decision.kill and not decision.signal_allowed
    assert "recycled" in decision.reason


def test_foreign_broker_wins_over_wedged_health() -> None:
    decision = decide(observe(status_instance_id="someone-else", health=None, silent_seconds=9.0, probe_attempts=3))
    assert decision.verdict is Verdict.FOREIGN
    assert not decision.kill and not decision.clean_files


def test_aged_reason_names_age_and_limit() -> None:
    decision = decide(observe(started_at=NOW - 7 * HOUR))
    assert decision.reason == "aged: started 7.0 h ago, max age 6.0 h"


def test_mismatch_reason_names_what_differs() -> None:
    assert "CODEX_HOME" in decide(observe(wanted_codex_home="/x")).reason
    assert "command" in decide(observe(wanted_app_server_command=("x",))).reason


def test_aged_takes_precedence_over_mismatched() -> None:
    decision = decide(observe(started_at=NOW - 7 * HOUR, wanted_codex_home="/x"))
    assert decision.verdict is Verdict.AGED


@pytest.mark.parametrize(
    ("age_seconds", "verdict"),
    [
        pytest.param(6 * HOUR - 1, Verdict.LIVE, id="one-second-young"),
        pytest.param(6 * HOUR, Verdict.LIVE, id="exactly-max-age"),
        pytest.param(6 * HOUR + 1, Verdict.AGED, id="one-second-over"),
        pytest.param(-60.0, Verdict.LIVE, id="started-in-the-future"),
    ],
)
def test_age_boundaries(age_seconds: float, verdict: Verdict) -> None:
    assert decide(observe(started_at=NOW - age_seconds)).verdict is verdict


@pytest.mark.parametrize("limit", [0.0, -1.0], ids=["zero", "negative"])
def test_max_age_zero_or_less_never_ages(limit: float) -> None:
    decision = decide(observe(started_at=NOW - 1000 * HOUR, max_age_seconds=limit))
    assert decision.verdict is Verdict.LIVE


@pytest.mark.parametrize(
    ("caller_hours", "broker_hours", "age_hours", "verdict"),
    [
        pytest.param(0.5, 6.0, 2.0, Verdict.LIVE, id="broker-long-caller-short-not-aged"),
        pytest.param(6.0, 0.5, 2.0, Verdict.AGED, id="broker-short-caller-long-aged"),
        pytest.param(1.0, 0.0, 1000.0, Verdict.LIVE, id="broker-never-caller-short-not-aged"),
        pytest.param(0.0, 1.0, 2.0, Verdict.AGED, id="broker-short-caller-never-aged"),
        pytest.param(0.5, None, 2.0, Verdict.AGED, id="broker-silent-on-it-caller-short-aged"),
        pytest.param(6.0, None, 2.0, Verdict.LIVE, id="broker-silent-on-it-caller-long-not-aged"),
    ],
)
def test_aged_row_judges_a_broker_by_its_own_max_age_else_the_callers(
    caller_hours: float, broker_hours: float | None, age_hours: float, verdict: Verdict
) -> None:
    decision = decide(observe(started_at=NOW - age_hours * HOUR, max_age_seconds=caller_hours * HOUR,
                              broker_max_age_seconds=None if broker_hours is None else broker_hours * HOUR))
    assert decision.verdict is verdict
    if verdict is Verdict.AGED:
        limit = broker_hours if broker_hours is not None else caller_hours
        assert decision.reason == f"aged: started {age_hours:.1f} h ago, max age {limit:.1f} h"


# --- environment --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected_hours"),
    [
        pytest.param({}, 6.0, id="default-6h"),
        pytest.param({"CODEX_BROKER_MAX_AGE_HOURS": "2"}, 2.0, id="own-variable"),
        pytest.param({"CODEX_COMPANION_BROKER_MAX_AGE_HOURS": "3.5"}, 3.5, id="companion-fallback"),
        pytest.param(
            {"CODEX_BROKER_MAX_AGE_HOURS": "1", "CODEX_COMPANION_BROKER_MAX_AGE_HOURS": "9"},
            1.0,
            id="own-variable-wins",
        ),
        pytest.param({"CODEX_BROKER_MAX_AGE_HOURS": ""}, 6.0, id="empty-means-unset"),
        pytest.param({"CODEX_BROKER_MAX_AGE_HOURS": " 0 "}, 0.0, id="zero-means-never"),
    ],
)
def test_max_age_from_env(env: dict[str, str], expected_hours: float) -> None:
    assert max_age_seconds(env) == expected_hours * HOUR


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("CODEX_BROKER_MAX_AGE_HOURS", "six", id="not-a-number"),
        pytest.param("CODEX_BROKER_MAX_AGE_HOURS", "-1", id="negative"),
        pytest.param("CODEX_BROKER_MAX_AGE_HOURS", "nan", id="nan"),
        pytest.param("CODEX_COMPANION_BROKER_MAX_AGE_HOURS", "inf", id="companion-inf"),
    ],
)
def test_invalid_max_age_is_a_usage_error_naming_variable_and_value(name: str, value: str) -> None:
    with pytest.raises(UsageError) as info:
        max_age_seconds({name: value})
    assert name in str(info.value) and value in str(info.value)
    assert info.value.exit_code == 2


def test_codex_home_unset_or_empty_is_home_dot_codex(tmp_path: Path) -> None:
    home = os.path.realpath(tmp_path)
    expected = os.path.join(home, ".codex")
    assert resolve_codex_home({"HOME": home}) == expected
    assert resolve_codex_home({"HOME": home, "CODEX_HOME": ""}) == expected
    assert resolve_codex_home({"HOME": home, "CODEX_HOME": "~/.codex"}) == expected


def test_codex_home_is_normalized_and_symlinks_resolved(tmp_path: Path) -> None:
    real = os.path.join(os.path.realpath(tmp_path), "real-home")
    os.mkdir(real)
    link = os.path.join(os.path.realpath(tmp_path), "link-home")
    os.symlink(real, link)
    assert resolve_codex_home({"CODEX_HOME": link + "/./"}) == real
    assert resolve_codex_home({"CODEX_HOME": real + "/sub/.."}) == real
