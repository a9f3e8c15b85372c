"""`codex-broker gc` acts only on proof: a broker is one by its exact serve argv in the spawn layout,
orphaned only against the record of its own workspace in the state root it names (under that
workspace's lock), never while it may still be starting; a directory is deleted only when it
provably is a dead session directory spawn created; each problem is one line and gc goes on.

Real brokers (spawned by ensure, or started by hand where a test needs an odd endpoint) in front
of the fake app-server; gc runs as the CLI, as a user would. ``CODEX_BROKER_SPAWN_TIMEOUT=0``
makes every broker and directory old enough for gc, where a test needs that."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lifecycle_support import WAIT, World, process, wait_exit, wait_until, world_for

from protos import broker_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def gc(world: World, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = world.cli("gc", *args, env=world.env_with(**env))
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result.stderr
    return result


OLD = {"CODEX_BROKER_SPAWN_TIMEOUT": "0"}


@contextlib.contextmanager
def hand_broker(world: World, endpoint: str, *, stopped: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m proxy serve` on ``endpoint``, SERVING (then SIGSTOPped if asked); stopped at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--endpoint", endpoint, "--instance-id",
                             f"hand-{os.getpid()}", "--app-server", world.fake_command()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_serving(endpoint)
        if stopped:
            proc.send_signal(signal.SIGSTOP)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_serving(endpoint: str) -> None:
    """A Health Watch that waits for the socket, until it reports SERVING (an event, not a poll)."""
    with grpc.insecure_channel(endpoint) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT,
                                                          wait_for_ready=True)
        try:
            for reply in call:
                if reply.status == SERVING:
                    return
        finally:
            call.cancel()
    raise AssertionError(f"{endpoint} never reported SERVING")


# -- brokers that are still starting ---------------------------------------------------------
def test_gc_beside_an_ensure_never_kills_the_broker_it_is_starting(world: World) -> None:
    outcome: dict[str, Any] = {}

    def ensure() -> None:
        try:
            outcome["broker"] = world.ensure(env=world.env_with(FAKE_STARTUP_SECONDS="8"))
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=ensure, name="ensure")
    thread.start()
    try:
        starting = wait_until(lambda: world.brokers(), what="the broker ensure is starting")[0]

        report = json.loads(gc(world, "--json", **OLD).stdout)  # old enough: only the lock protects it

        assert not any(str(starting.pid) in line for line in report["actions"]), report
    finally:
        thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    broker = outcome["broker"]
    assert broker.pid == starting.pid
    assert world.client(broker.endpoint).health() == "SERVING"


def test_gc_leaves_a_broker_younger_than_the_spawn_deadline_alone(world: World) -> None:
    broker = world.ensure()
    world.state().record_path.unlink()  # unrecorded: an orphan, but one that may still be starting

    out = gc(world).stdout

    assert str(broker.pid) not in out
    assert world.client(broker.endpoint).status().state == broker_pb2.BROKER_STATE_SERVING


# -- which state root a broker belongs to ----------------------------------------------------
def test_gc_under_another_state_root_leaves_recorded_brokers_alone(world: World, tmp_path: Path) -> None:
    broker = world.ensure()

    out = gc(world, CODEX_BROKER_STATE_DIR=str(tmp_path / "other-state"), **OLD).stdout

    assert str(broker.pid) not in out
    assert world.client(broker.endpoint).status().state == broker_pb2.BROKER_STATE_SERVING
    assert world.ensure().pid == broker.pid


# -- what is a broker ------------------------------------------------------------------------
def test_gc_never_touches_a_process_that_only_mentions_serve_and_a_runtime_endpoint(world: World) -> None:
    session = Path(world.runtime) / "abcd1234"
    session.mkdir(mode=0o700)
    imposter = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "serve", "--endpoint", f"unix:{session}/s.sock",
         "--instance-id", "not-a-broker", "--state-root", world.state_dir, "--cwd", str(world.workspace)],
        stdin=subprocess.DEVNULL)
    try:
        os.utime(session, (time.time() - 3600, time.time() - 3600))

        out = gc(world, **OLD).stdout

        assert imposter.poll() is None, "a process that is not a broker was signalled"
        assert str(imposter.pid) not in out
        assert session.is_dir(), "the directory a live process names was deleted"
    finally:
        imposter.kill()
        imposter.wait(timeout=10)


# -- what may be deleted ---------------------------------------------------------------------
def test_gc_never_deletes_outside_the_runtime_dir_for_an_endpoint_with_dotdot(world: World) -> None:
    outside = tempfile.mkdtemp(prefix="cxo", dir="/tmp")
    try:
        endpoint = f"unix:{world.runtime}/../{os.path.basename(outside)}/s.sock"
        with hand_broker(world, endpoint, stopped=True) as proc:
            out = gc(world, **OLD).stdout

            assert os.path.isdir(outside) and os.path.exists(os.path.join(outside, "s.sock")), out
            assert proc.poll() is None and str(proc.pid) not in out
    finally:
        for name in ("s.sock", "broker.pid"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(outside, name))
        os.rmdir(outside)


def test_gc_never_deletes_the_runtime_dir_for_a_broker_listening_directly_in_it(world: World) -> None:
    recorded = world.ensure()
    with hand_broker(world, f"unix:{world.runtime}/s.sock", stopped=True) as proc:
        out = gc(world, **OLD).stdout

        assert os.path.isdir(world.runtime), out
        assert os.path.exists(recorded.endpoint.removeprefix("unix:")), "a live broker's socket was deleted"
        assert world.client(recorded.endpoint).health() == "SERVING"
        assert proc.poll() is None and str(proc.pid) not in out


def test_gc_removes_only_old_dead_session_dirs_that_spawn_named(world: World) -> None:
    runtime = Path(world.runtime)
    long_ago = time.time() - 3600

    def session_dir(name: str, *files: str, old: bool = True) -> Path:
        path = runtime / name
        path.mkdir(mode=0o700)
        for file in files:
            (path / file).touch()
        if old:
            os.utime(path, (long_ago, long_ago))
        return path

    dead = session_dir("0badcafe", "s.sock", "broker.pid")
    young = session_dir("1badcafe", "s.sock", old=False)
    other_name = session_dir("not-a-session", "s.sock")
    foreign_files = session_dir("2badcafe", "s.sock", "notes.txt")
    listening = session_dir("3badcafe")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(listening / "s.sock"))
    listener.listen(1)
    os.utime(listening, (long_ago, long_ago))
    try:
        out = gc(world).stdout
    finally:
        listener.close()

    assert f"removed dead session directory {dead}" in out and not dead.exists()
    for kept in (young, other_name, foreign_files, listening):
        assert kept.is_dir(), f"{kept} was deleted:\n{out}"
    assert f"left {foreign_files} alone: it holds files a broker does not leave (notes.txt)" in out
    assert (listening / "s.sock").exists()


# -- problems ----------------------------------------------------------------------------------
def test_gc_reports_each_problem_on_one_line_and_goes_on(world: World, tmp_path: Path) -> None:
    unreadable = world.ensure()
    record = world.state().record_path
    record.unlink()
    record.mkdir()  # the record cannot be read: this broker cannot be judged
    other = tmp_path / "ws2"
    other.mkdir()
    orphan = world.ensure(workspace=other)
    orphan_proc = process(orphan.pid)
    world.state(other).record_path.unlink()

    lines = gc(world, **OLD).stdout.strip().splitlines()

    assert [line for line in lines if str(unreadable.pid) in line] == [
        line for line in lines if line.startswith(f"problem with broker pid {unreadable.pid}: StateError: cannot read")]
    assert len([line for line in lines if str(unreadable.pid) in line]) == 1, lines
    assert f"asked orphaned broker pid {orphan.pid} to drain ({orphan.endpoint})" in lines
    assert wait_exit(orphan_proc, 15)
    assert world.client(unreadable.endpoint).health() == "SERVING"


def test_gc_kills_an_unresponsive_orphan_only_with_its_identity_proven(world: World, tmp_path: Path) -> None:
    broker = world.ensure()
    proc = process(broker.pid)
    app_server = psutil.Process(world.client(broker.endpoint).status().app_server_pid)
    world.state().record_path.unlink()
    proc.suspend()  # SIGSTOP: it no longer answers, but the kernel still accepts connections for it

    out = gc(world, **OLD).stdout

    assert f"killed unresponsive orphaned broker pid {broker.pid}" in out, out
    assert wait_exit(proc, 10) and wait_exit(app_server, 10)
