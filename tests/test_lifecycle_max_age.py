"""ensure and the broker's own max age: spawn passes the caller's max age explicitly, and a
broker is judged by the max age it reports, so one caller's environment never rotates a broker
another caller spawned under a different setting (nor makes its replacement drain itself)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_support import World, process, wait_exit, world_for

from proxy import contract

TINY_AGE_HOURS = "0.0003"  # ~1.1 s
TINY_AGE_SECONDS = float(TINY_AGE_HOURS) * 3600


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def test_a_broker_spawned_with_a_long_max_age_is_not_rotated_by_a_caller_whose_setting_is_short(world: World
                                                                                                  ) -> None:
    long_lived = world.ensure()  # the default: 6 hours
    argv = contract.parse_serve_argv(process(long_lived.pid).cmdline())
    assert argv is not None and argv.max_age_hours == 6.0, "spawn must pass the caller's max age explicitly"
    status = world.client(long_lived.endpoint).status()
    assert status.max_age_hours == 6.0
    # A real clock condition: the broker's age (from its own start time) passes the short max age.
    time.sleep(max(0.0, status.started_at + TINY_AGE_SECONDS + 0.2 - time.time()))

    again = world.ensure(world.env_with(CODEX_BROKER_MAX_AGE_HOURS=TINY_AGE_HOURS))

    assert again.reused and again.verdict == "live" and again.pid == long_lived.pid, again
    assert world.state().history() == []


def test_a_broker_spawned_with_a_short_max_age_is_replaced_for_a_caller_whose_setting_is_long(world: World
                                                                                                ) -> None:
    short_lived = world.ensure(world.env_with(CODEX_BROKER_MAX_AGE_HOURS=TINY_AGE_HOURS))
    short_proc = process(short_lived.pid)
    record = world.record()
    assert record is not None and record.max_age_seconds == pytest.approx(TINY_AGE_SECONDS)
    assert world.client(short_lived.endpoint).status().max_age_hours == pytest.approx(float(TINY_AGE_HOURS))
    assert wait_exit(short_proc, 30), "a broker past its own max age, with no work, drains and exits by itself"

    replacement = world.ensure()  # the default 6 hours

    assert not replacement.reused and replacement.pid != short_lived.pid
    assert world.client(replacement.endpoint).status().max_age_hours == 6.0
    record = world.record()
    assert record is not None and record.pid == replacement.pid and record.max_age_seconds == 6 * 3600.0
    assert world.ensure().pid == replacement.pid, "the replacement must not drain itself by the old setting"


def test_status_shows_the_brokers_own_max_age_and_wedge_limit_or_says_an_older_broker_did_not_report_them(
        ) -> None:
    from lifecycle.cli import format_status
    from protos import broker_pb2

    now = 1_800_000_000.0
    told = broker_pb2.BrokerStatus(started_at=now - 3600, max_age_hours=6.0, exit_when_wedged_seconds=30.0)
    text = format_status(told, now=now)
    assert "max age          6 h, drains itself in 5h00m" in text
    assert "exit if wedged   after 30 s wedged (exit 1)" in text
    never = format_status(broker_pb2.BrokerStatus(max_age_hours=0.0, exit_when_wedged_seconds=0.0), now=now)
    assert "max age          never" in never and "exit if wedged   never" in never
    older = format_status(broker_pb2.BrokerStatus(), now=now)
    assert "max age          not reported" in older and "exit if wedged   not reported" in older
    odd = format_status(broker_pb2.BrokerStatus(max_age_hours=float("inf"), exit_when_wedged_seconds=float("nan")),
                        now=now)
    assert "max age          inf" in odd and "exit if wedged   nan" in odd
