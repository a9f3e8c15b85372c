"""The event loop `serve` runs on: `auto` by default (uvloop where it is installed, which it is
here, else asyncio's own), or the one asked for by `--event-loop` or CODEX_BROKER_EVENT_LOOP (the
flag wins). The places where the two loops behave differently are tested on both where they arise
(test_proxy_lifetime's orphan reaping, test_proxy_serve_cli's app-server exiting at once,
test_jsonl_companion's ends, test_proxy_drain's Call pending at a stop)."""
from __future__ import annotations

import json
import os
import sys

import pytest
from grpc_health.v1 import health_pb2
from harness import error_lines, fake_command, new_marker, processes_with, run_serve

from proxy import eventloop


@pytest.mark.parametrize("flags, env, name", [
    ((), {}, "uvloop"),  # auto, and uvloop is installed with the project here
    (("--event-loop", "asyncio"), {eventloop.EVENT_LOOP_ENV: "uvloop"}, "asyncio"),
    ((), {eventloop.EVENT_LOOP_ENV: "uvloop"}, "uvloop"),
    (("--event-loop", "uvloop"), {eventloop.EVENT_LOOP_ENV: "asyncio"}, "uvloop"),
    (("--event-loop", "auto"), {}, "uvloop"),
])
def test_serve_runs_on_the_loop_asked_for_and_serves_a_request_and_a_drain_on_it(broker, flags, env, name):
    b = broker(*flags, env=env)
    assert f"event loop: {name}" in b.log()
    assert b.health() == health_pb2.HealthCheckResponse.SERVING
    reply = b.call("thread/start", {"cwd": "/tmp"})
    assert json.loads(reply.result_json)["thread"]["id"]
    b.drain()
    assert b.wait_exit(30) == 0


def test_an_unknown_event_loop_in_the_environment_is_refused_before_anything_starts(base):
    marker = new_marker()
    sock_dir = os.path.join(base, "d")
    result = run_serve("--endpoint", f"unix:{sock_dir}/s.sock", "--app-server", fake_command(marker=marker),
                       env={eventloop.EVENT_LOOP_ENV: "libev"})
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert eventloop.EVENT_LOOP_ENV in line and "'libev'" in line and "uvloop" in line
    assert not os.path.exists(sock_dir)
    assert not processes_with(marker)


def test_an_unknown_event_loop_flag_is_a_usage_error(base):
    result = run_serve("--endpoint", f"unix:{base}/s.sock", "--event-loop", "libev")
    assert result.returncode == 2
    assert "--event-loop" in result.stderr and "invalid choice" in result.stderr


def test_the_choice_is_the_flag_then_the_variable_then_auto():
    assert eventloop.choice(None, {}) == eventloop.AUTO
    assert eventloop.choice(None, {eventloop.EVENT_LOOP_ENV: " AsyncIO "}) == eventloop.ASYNCIO
    assert eventloop.choice(None, {eventloop.EVENT_LOOP_ENV: ""}) == eventloop.AUTO
    assert eventloop.choice("uvloop", {eventloop.EVENT_LOOP_ENV: "asyncio"}) == eventloop.UVLOOP
    with pytest.raises(eventloop.EventLoopError, match="CODEX_BROKER_EVENT_LOOP"):
        eventloop.choice(None, {eventloop.EVENT_LOOP_ENV: "tokio"})


def test_auto_falls_back_to_asyncios_loop_where_uvloop_is_missing_and_uvloop_asked_for_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    name, new_loop = eventloop.factory(eventloop.AUTO)
    assert name == "asyncio"
    loop = new_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()
    with pytest.raises(eventloop.EventLoopError, match="uvloop is not installed"):
        eventloop.factory(eventloop.UVLOOP)
