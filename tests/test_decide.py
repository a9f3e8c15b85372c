"""Every row of the ensure decision table, without a process in sight."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from lifecycle.decide import (
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


ROWS = [
    pytest.param(dict(record_present=False), Verdict.NONE, id="no-record"),
    pytest.param(dict(record_corrupt=True), Verdict.NONE, id="corrupt-record"),
    pytest.param(dict(pid_alive=False, create_time_matches=False), Verdict.DEAD, id="pid-gone"),
    pytest.param(dict(create_time_matches=False), Verdict.DEAD, id="pid-recycled"),
    pytest.param(dict(status_instance_id="other"), Verdict.FOREIGN, id="foreign-instance"),
    pytest.param(dict(health=None), Verdict.WEDGED, id="wedged-health-unreachable"),
    pytest.param(
        dict(health=None, status_answered=False, status_instance_id=None, broker_state=None),
        Verdict.WEDGED,
        id="wedged-status-silent-identity-by-pid",
    ),
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


# The action columns, per verdict: (reuse, spawn, drain, force_drain, kill, clean_files, signal_allowed)
ACTIONS = {
    Verdict.NONE: (False, True, False, False, False, False, False),
    Verdict.DEAD: (False, True, False, False, False, True, False),
    Verdict.FOREIGN: (False, True, False, False, False, False, False),
    Verdict.WEDGED: (False, True, False, False, True, True, True),
    Verdict.DRAINING: (False, True, False, False, False, False, True),
    Verdict.UNHEALTHY: (False, True, False, True, False, False, True),
    Verdict.AGED: (False, True, True, False, False, False, True),
    Verdict.MISMATCHED: (False, True, True, False, False, False, True),
    Verdict.LIVE: (True, False, False, False, False, False, True),
}


def _actions(d: Decision) -> tuple[bool, ...]:
    return (d.reuse, d.spawn, d.drain, d.force_drain, d.kill, d.clean_files, d.signal_allowed)


@pytest.mark.parametrize(("changes", "verdict"), ROWS)
def test_each_verdict_carries_its_actions(changes: dict[str, object], verdict: Verdict) -> None:
    assert _actions(decide(observe(**changes))) == ACTIONS[verdict]


def test_recycled_pid_is_never_signalled_even_if_health_fails() -> None:
    decision = decide(observe(create_time_matches=False, health=None, status_answered=False))
    assert decision.verdict is Verdict.DEAD
    assert not decision.kill and not decision.signal_allowed
    assert "recycled" in decision.reason


def test_foreign_broker_wins_over_wedged_health() -> None:
    decision = decide(observe(status_instance_id="someone-else", health=None))
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
