"""--metrics-endpoint: Prometheus metrics scraped from a real broker that has done known work."""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import urllib.error
import urllib.request

import grpc
from harness import (
    JsonlSession,
    SessionClient,
    aio_channel,
    connect_only,
    fake_command,
    jsonl_flags,
    jsonl_path,
    new_marker,
    run,
    run_serve,
    short_dir,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from protos import broker_pb2, broker_pb2_grpc
from proxy.broker import Broker
from proxy.config import ServeConfig

METRICS = ["--metrics-endpoint", "tcp:127.0.0.1:0"]


def metrics_url(b) -> str:
    found = re.search(r"metrics on tcp:127\.0\.0\.1:(\d+)", b.log())
    assert found, b.tail()
    return f"http://127.0.0.1:{found.group(1)}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_sessions_requests_turns_checks_and_messages_of_known_work(broker):
    directory = short_dir()
    path = jsonl_path(directory)
    b = broker(*METRICS, *jsonl_flags(path), "--probe-interval", "0.05")
    url = metrics_url(b)
    b.call("thread/loaded/list")

    async def main():
        async with aio_channel(b) as channel:
            s = SessionClient(channel)
            await s.initialize()  # 2 messages: initialize, initialized
            thread = await s.start_thread()
            turn = await s.start_turn(thread, "deltas=5")
            await s.turn_completed(thread, turn)
            echoed = await s.request("fake/echo", {"x": 1})  # not a method the metrics name: "other"
            assert "result" in echoed, echoed
            again = await s.request("initialize", {"clientInfo": {"name": "t", "version": "0"}})
            assert "error" in again
            assert connect_only(path) == b"" and connect_only(path) == b""  # the companion's checks
            j = await JsonlSession.connect(path)
            await j.initialize()  # 2 messages
            samples = scrape(url)
            await j.close()
            await s.done_writing()
            return samples

    try:
        samples = run(main())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert value(samples, "codex_broker_sessions_open", transport="grpc") == 1
    assert value(samples, "codex_broker_sessions_open", transport="jsonl") == 1
    assert value(samples, "codex_broker_sessions_opened_total", transport="grpc") == 1
    assert value(samples, "codex_broker_sessions_opened_total", transport="jsonl") == 1
    assert value(samples, "codex_broker_connection_checks_total", transport="jsonl") == 2
    assert value(samples, "codex_broker_connection_checks_total", transport="grpc") == 0
    assert value(samples, "codex_broker_sessions_dropped_slow_total", transport="grpc") == 0
    requests = {labels: n for (name, labels), n in samples.items() if name == "codex_broker_requests_total"}
    assert requests == {
        (("method", "initialize"), ("outcome", "ok"), ("via", "session")): 2,
        (("method", "initialize"), ("outcome", "error"), ("via", "session")): 1,
        (("method", "thread/start"), ("outcome", "ok"), ("via", "session")): 1,
        (("method", "turn/start"), ("outcome", "ok"), ("via", "session")): 1,
        (("method", "other"), ("outcome", "ok"), ("via", "session")): 1,
        (("method", "thread/loaded/list"), ("outcome", "ok"), ("via", "call")): 1,
    }
    assert value(samples, "codex_broker_turns_in_flight") == 0
    assert value(samples, "codex_broker_requests_pending") == 0
    assert value(samples, "codex_broker_turn_duration_seconds_count") == 1
    # grpc: initialize, initialized, thread/start, turn/start, fake/echo, initialize; jsonl: 2
    assert value(samples, "codex_broker_messages_routed_total", source="client") == 8
    assert value(samples, "codex_broker_bytes_routed_total", source="client") > 8 * 20
    # at least: initialize's answer, thread/start's and its thread/started, turn/start's, the turn's
    # 9 notifications (turn/started, item/started, 5 deltas, item/completed, turn/completed), fake/echo's
    assert value(samples, "codex_broker_messages_routed_total", source="app_server") >= 14
    assert value(samples, "codex_broker_app_server_exits_total") == 0
    assert value(samples, "codex_broker_state", state="SERVING") == 1
    assert value(samples, "codex_broker_state", state="DRAINING") == 0
    # the health loop probes every 0.05 s when nothing else answers: its latencies are observed
    wait_for(lambda: value(scrape(url), "codex_broker_health_probe_latency_seconds_count") >= 1, 20,
             "a probe latency observed")


def test_metrics_show_a_draining_broker_its_running_turn_and_the_new_work_it_refused(broker):
    b = broker(*METRICS)
    url = metrics_url(b)

    async def main():
        async with aio_channel(b) as channel:
            s = SessionClient(channel)
            await s.initialize()
            thread = await s.start_thread()
            await s.start_turn(thread, "deltas=2 seconds=60")
            b.drain(60)
            refused = await s.request("thread/start", {"cwd": "/tmp"})
            assert "error" in refused
            samples = scrape(url)
            b.drain(0, force=True)
            return samples

    samples = run(main())
    assert value(samples, "codex_broker_state", state="DRAINING") == 1
    assert value(samples, "codex_broker_state", state="SERVING") == 0
    assert value(samples, "codex_broker_turns_in_flight") == 1
    assert value(samples, "codex_broker_requests_total", via="session", method="thread/start", outcome="refused") == 1
    assert value(samples, "codex_broker_requests_total", via="session", method="thread/start", outcome="ok") == 1


def test_metrics_count_a_session_dropped_as_slow(broker):
    b = broker(*METRICS, "--session-buffer", "65536")
    url = metrics_url(b)

    async def main():
        async with aio_channel(b) as channel:
            s = SessionClient(channel, read=False)  # never reads: its buffer fills
            await s.send({"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "t", "version": "0"}}})
            await s.send({"id": 2, "method": "thread/start", "params": {"cwd": "/tmp"}})
            await s.send({"id": 3, "method": "turn/start", "params": {
                "threadId": "t-slow", "input": [{"type": "text", "text": "deltas=50000"}]}})
            wait_for(lambda: value(scrape(url), "codex_broker_sessions_dropped_slow_total", transport="grpc") == 1,
                     30, "the slow Session dropped")
            s._cancel()

    run(main())
    assert value(scrape(url), "codex_broker_sessions_open", transport="grpc") == 0


def http_error(request: str | urllib.request.Request) -> int:
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as exc:
        return exc.code
    raise AssertionError("expected an HTTP error")


def test_metrics_endpoint_serves_only_get_of_the_metrics_path(broker):
    b = broker(*METRICS)
    url = metrics_url(b)
    assert http_error(url.replace("/metrics", "/other")) == 404
    assert http_error(urllib.request.Request(url, data=b"x", method="POST")) == 405
    assert value(scrape(url), "codex_broker_state", state="SERVING") == 1


def test_metrics_endpoint_off_loopback_is_refused_without_allow_remote(tmp_path):
    result = run_serve("--endpoint", f"unix:{tmp_path}/d/s.sock", "--app-server", "true",
                       "--metrics-endpoint", "tcp:0.0.0.0:0")
    assert result.returncode == 2
    assert "--metrics-endpoint tcp:0.0.0.0:0 is not loopback: pass --allow-remote" in result.stderr


def test_an_app_server_exit_counts_once_and_fails_the_pending_requests_of_sessions_and_calls():
    """In process: the broker's own registry is read after run() returned (exit 1)."""
    base = short_dir()
    marker = new_marker()
    sock = os.path.join(base, "d", "s.sock")
    config = ServeConfig(endpoint=f"unix:{sock}", app_server=shlex.split(fake_command(marker=marker)), cwd=base,
                         metrics_endpoint="tcp:127.0.0.1:0")

    async def main() -> tuple[int, Broker]:
        broker = Broker(config)
        running = asyncio.create_task(broker.run())
        try:
            await asyncio.wait([running, asyncio.ensure_future(broker.ready.wait())], timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            assert broker.ready.is_set(), running.result() if running.done() else "not ready in 30 s"
            async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
                s = SessionClient(channel)
                await s.initialize()
                slow = await s.send_request("fake/slow", {"seconds": 60})
                stub = broker_pb2_grpc.AppServerStub(channel)
                exit_call = stub.Call(broker_pb2.CallRequest(method="fake/exit", params_json='{"code": 3}'))
                reply = await exit_call
                assert reply.HasField("error"), reply
                assert "error" in await asyncio.wait_for(slow, 30)
            return await asyncio.wait_for(running, 30), broker
        except BaseException:
            broker.stop(1)
            await asyncio.wait([running], timeout=30)
            raise

    try:
        code, broker = asyncio.run(main())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert code == 1
    assert broker.metrics is not None
    registry = broker.metrics.registry
    assert registry.get_sample_value("codex_broker_app_server_exits_total") == 1
    assert registry.get_sample_value("codex_broker_requests_total",
                                     {"via": "session", "method": "other", "outcome": "failed"}) == 1
    assert registry.get_sample_value("codex_broker_requests_total",
                                     {"via": "call", "method": "other", "outcome": "failed"}) == 1
    assert registry.get_sample_value("codex_broker_state", {"state": "STOPPING"}) == 1
