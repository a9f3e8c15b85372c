"""End to end with the REAL ``codex app-server`` (npm launcher + native binary), offline.

Every broker is obtained the way a companion gets one, ``lifecycle.ensure_broker``, in a
private state dir and runtime dir; codex talks to the local Responses-API mock through the
``CODEX_HOME`` written by ``write_codex_home``. Each test ends by stopping what is still
running and asserting that no process of its brokers (the broker, the Node launcher, the
native codex) survives. Timings the design promises are asserted with margin and printed
(run with ``-s`` to see them)."""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import pytest
from codex_support import CodexWorld, Follower, agent_text, deltas, text_input, wait_until
from mock_responses import MockResponses, last_user_text

from lifecycle import identity
from lifecycle.errors import AppServerError, SessionClosed
from protos import broker_pb2

pytestmark = [pytest.mark.codex, pytest.mark.timeout(90)]

DELTA = "item/agentMessage/delta"


@pytest.fixture
def world(tmp_path):
    with MockResponses() as mock:
        w = CodexWorld(tmp_path, mock)
        try:
            yield w
        finally:
            problems = w.finish()  # a no-op when the test already finished cleanly
    assert not problems, "\n".join(problems) + "\n" + w.log_tails()


def finish_clean(world: CodexWorld) -> None:
    """Stop every broker still running and fail if any process of any broker is left."""
    problems = world.finish()
    assert not problems, "\n".join(problems) + "\n" + world.log_tails()


def start_thread(session: Any, world: CodexWorld) -> str:
    result = session.request("thread/start", {"cwd": str(world.workspace)}, timeout=30)
    return result["thread"]["id"]  # type: ignore[no-any-return]


def start_turn(session: Any, thread_id: str, prompt: str) -> str:
    result = session.request("turn/start", {"threadId": thread_id, "input": text_input(prompt)}, timeout=30)
    assert result["turn"]["status"] == "inProgress", result
    return result["turn"]["id"]  # type: ignore[no-any-return]


def report(text: str) -> None:
    print(f"\n[codex e2e] {text}")


def escalation(caplog: pytest.LogCaptureFixture) -> str:
    killed = [r.getMessage() for r in caplog.records if "killing it" in r.getMessage()]
    return "the forced drain was escalated to SIGKILL" if killed else "the broker exited by its forced drain"


# -- 1 ---------------------------------------------------------------------------------------
def test_full_turn_streams_deltas_and_completes_with_the_mock_text(world):
    broker = world.ensure()
    assert broker.verdict == "none" and not broker.reused
    session = world.session(broker)
    thread_id = start_thread(session, world)
    prompt = "greet me reply=hello deltas=4"
    turn_id = start_turn(session, thread_id, prompt)

    seen: list[dict[str, Any]] = []
    turn = session.follow_turn(thread_id, turn_id, timeout=30, on_message=seen.append)

    assert turn["id"] == turn_id
    assert turn["status"] == "completed", turn
    assert agent_text(turn) == "hello" * 4
    assert deltas(seen, turn_id) == ["hello"] * 4
    methods = [m.get("method") for m in seen]
    first_delta = methods.index(DELTA)
    assert "turn/started" in methods[:first_delta], methods
    completed = [m["params"]["item"] for m in seen if m.get("method") == "item/completed"
                 and m["params"]["item"].get("type") == "agentMessage"]
    assert [item["text"] for item in completed] == ["hello" * 4]
    assert methods[-1] == "turn/completed"
    assert len(world.mock.requests) == 1 and last_user_text(world.mock.requests[0]) == prompt
    # the same broker is reused while it is young and healthy
    again = world.ensure()
    assert again.reused and again.pid == broker.pid and again.verdict == "live"
    finish_clean(world)


# -- 2 ---------------------------------------------------------------------------------------
def test_aged_broker_rotates_gracefully_while_its_turn_finishes_then_exits_alone(world):
    # A is spawned with a short max age of its own: past it, it drains itself (its turn goes on)
    max_age_s = 15.0
    a = world.ensure(CODEX_BROKER_MAX_AGE_HOURS=repr(max_age_s / 3600))
    tracked_a = world.tracked(a)
    tree_a = world.codex_tree(a)
    session_a = world.session(a, name="on-a")
    thread_a = start_thread(session_a, world)
    turn_a = start_turn(session_a, thread_a, "long one reply=tick deltas=30 delay=1")
    follow_a = Follower(session_a, thread_a, turn_a, timeout=80)
    follow_a.wait_first_delta(20)
    assert world.client(a).status().state == broker_pb2.BROKER_STATE_SERVING, "A drained before its turn ran"

    watch = world.watch_health(a, timeout=40)
    assert "NOT_SERVING" in (status for _, status in watch), "A never drained itself past its max age"
    watch.close()
    t0 = time.monotonic()
    b = world.ensure()  # the default max age: B does not inherit A's
    rotate_s = time.monotonic() - t0
    assert b.verdict == "draining", b
    assert b.pid != a.pid and b.instance_id != a.instance_id
    assert not follow_a.done, "the turn on A ended while A was rotated"
    status_a = world.client(a).status()
    assert status_a.state == broker_pb2.BROKER_STATE_DRAINING, status_a
    assert "max age" in status_a.drain_reason, status_a.drain_reason
    assert [t.turn_id for t in status_a.in_flight_turns] == [turn_a]
    assert world.client(b).status().max_age_hours == 6.0

    # meanwhile a new turn runs on B and completes, before A's turn is over
    session_b = world.session(b, name="on-b")
    thread_b = start_thread(session_b, world)
    turn_b = start_turn(session_b, thread_b, "fresh reply=new deltas=2")
    done_b = session_b.follow_turn(thread_b, turn_b, timeout=30)
    assert done_b["status"] == "completed" and agent_text(done_b) == "newnew", done_b
    assert not follow_a.done, "A's turn was over before B's turn completed: nothing overlapped"

    done_a = follow_a.wait(60)
    assert done_a["status"] == "completed", done_a
    assert agent_text(done_a) == "tick" * 30
    assert deltas(follow_a.messages, turn_a) == ["tick"] * 30

    # A finishes alone: it exits, and its launcher and native codex go with it
    assert follow_a.done_at is not None
    world.assert_all_gone(tracked_a, 10.0, "the drained broker A did not finish alone")
    gone_s = time.monotonic() - follow_a.done_at
    assert all(pid in tracked_a.known for pid in (tree_a.launcher.pid, tree_a.native.pid))
    report(f"rotation: ensure took {rotate_s:.2f} s; A and its codex gone {gone_s:.2f} s after its last turn")

    assert world.client(b).health() == "SERVING"
    again = world.ensure()
    assert again.reused and again.pid == b.pid
    finish_clean(world)


# -- 3 ---------------------------------------------------------------------------------------
def test_stopped_native_codex_reads_not_serving_and_ensure_replaces_the_whole_broker(world, caplog):
    caplog.set_level(logging.INFO, logger="codex_broker.lifecycle")
    a = world.ensure()
    tracked_a = world.tracked(a)
    tree_a = world.codex_tree(a)
    assert tree_a.native.pid != a.pid

    watch = world.watch_health(a, timeout=30)
    _, first = next(watch)
    assert first == "SERVING"
    t0 = time.monotonic()
    tree_a.native.send_signal(signal.SIGSTOP)
    seen, not_serving_at = [], None
    for at, status in watch:
        seen.append(status)
        if status == "NOT_SERVING":
            not_serving_at = at
            break
    watch.close()
    if not_serving_at is None:
        pytest.fail(f"Watch never said NOT_SERVING within 30 s of SIGSTOP (saw {seen})")
    not_serving_s = not_serving_at - t0
    assert not_serving_s < 10, f"NOT_SERVING only {not_serving_s:.1f} s after SIGSTOP (design: within 5 s)"
    assert world.client(a).health() == "NOT_SERVING"

    t1 = time.monotonic()
    b = world.ensure()
    ensure_s = time.monotonic() - t1
    assert b.verdict == "unhealthy", b
    assert b.pid != a.pid
    world.assert_all_gone(tracked_a, 5.0, "ensure replaced the wedged broker")
    report(f"hang: Watch NOT_SERVING {not_serving_s:.2f} s after SIGSTOP of the native codex; "
           f"ensure replaced the broker in {ensure_s:.2f} s ({escalation(caplog)})")

    assert world.client(b).health() == "SERVING"
    assert world.client(b).call("thread/loaded/list", {}, timeout=10) == {"data": [], "nextCursor": None}
    finish_clean(world)


# -- 4 ---------------------------------------------------------------------------------------
def test_killed_native_codex_fails_the_turn_follower_at_once_and_ensure_spawns_anew(world):
    a = world.ensure()
    tracked_a = world.tracked(a)
    tree_a = world.codex_tree(a)
    session = world.session(a)
    thread_id = start_thread(session, world)
    turn_id = start_turn(session, thread_id, "slow reply=zz deltas=30 delay=0.5")
    follow = Follower(session, thread_id, turn_id, timeout=60)
    follow.wait_first_delta(20)

    t0 = time.monotonic()
    tree_a.native.send_signal(signal.SIGKILL)
    error = follow.error_within(10)
    assert follow.done_at is not None
    error_s = follow.done_at - t0
    assert isinstance(error, SessionClosed), repr(error)
    message = str(error)
    assert "app-server" in message and ("killed" in message or "exit" in message), message
    assert error_s < 5, f"the follower learned of the crash only after {error_s:.1f} s: {message}"
    report(f"crash: follower got {message[:120]!r} {error_s:.2f} s after SIGKILL")

    # the broker exits by itself (status 1, no restart loop), and nothing of its codex is left
    world.assert_all_gone(tracked_a, 10.0, "the broker whose codex crashed did not exit alone")
    exit_s = time.monotonic() - t0
    report(f"crash: broker A and its codex gone {exit_s:.2f} s after SIGKILL")

    b = world.ensure()
    assert b.pid != a.pid and b.instance_id != a.instance_id
    assert b.verdict == "dead", b
    assert world.client(b).health() == "SERVING"

    session_b = world.session(b)
    thread_b = start_thread(session_b, world)
    done = session_b.follow_turn(thread_b, start_turn(session_b, thread_b, "again reply=ok deltas=1"), timeout=30)
    assert done["status"] == "completed" and agent_text(done) == "ok"
    finish_clean(world)


def test_killed_broker_mid_turn_fails_the_follower_at_once_and_takes_codex_with_it(world):
    a = world.ensure()
    tracked_a = world.tracked(a)
    world.codex_tree(a)
    session = world.session(a)
    thread_id = start_thread(session, world)
    turn_id = start_turn(session, thread_id, "slow reply=zz deltas=30 delay=0.5")
    follow = Follower(session, thread_id, turn_id, timeout=60)
    follow.wait_first_delta(20)

    t0 = time.monotonic()
    tracked_a.proc.send_signal(signal.SIGKILL)  # pinned by create time
    error = follow.error_within(5)
    assert follow.done_at is not None
    assert isinstance(error, SessionClosed), repr(error)
    error_s = follow.done_at - t0
    assert error_s < 5, f"the follower learned of the broker's death only after {error_s:.1f} s"
    # the launcher dies with the broker (parent-death signal); the native codex sees stdin EOF
    world.assert_all_gone(tracked_a, 5.0, "codex outlived its SIGKILLed broker")
    report(f"broker killed: follower got {str(error)[:80]!r} {error_s:.2f} s after SIGKILL; "
           f"codex gone {time.monotonic() - t0:.2f} s after")
    b = world.ensure()
    assert b.verdict == "dead" and b.pid != a.pid, b
    assert world.client(b).health() == "SERVING"
    finish_clean(world)


# -- 5 ---------------------------------------------------------------------------------------
def test_interrupt_from_a_second_session_ends_the_first_sessions_turn(world):
    broker = world.ensure()
    starter = world.session(broker, name="starter")
    thread_id = start_thread(starter, world)
    turn_id = start_turn(starter, thread_id, "endless reply=blah deltas=60 delay=0.5")
    follow = Follower(starter, thread_id, turn_id, timeout=40)
    follow.wait_first_delta(20)

    other = world.session(broker, name="interrupter")
    t0 = time.monotonic()
    assert other.request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id}, timeout=10) == {}
    turn = follow.wait(15)
    assert follow.done_at is not None
    assert turn["status"] == "interrupted", turn
    report(f"interrupt: the starter saw turn/completed(interrupted) {follow.done_at - t0:.2f} s after the request")
    # the interrupter subscribed by naming the thread: it sees the end of the turn too
    assert other.follow_turn(thread_id, turn_id, timeout=10)["status"] == "interrupted"

    # the thread stays usable
    done = starter.follow_turn(thread_id, start_turn(starter, thread_id, "next reply=fine deltas=1"), timeout=30)
    assert done["status"] == "completed" and agent_text(done) == "fine"
    finish_clean(world)


# -- 6 ---------------------------------------------------------------------------------------
def test_command_approval_reaches_the_turns_session_and_accept_lets_it_complete(world):
    broker = world.ensure()
    session = world.session(broker)
    thread_id = start_thread(session, world)
    turn_id = start_turn(session, thread_id, "check the os approve=1 reply=done deltas=2")
    asked: list[dict[str, Any]] = []

    def accept(request: dict[str, Any]) -> Any:
        asked.append(request)
        return {"decision": "accept"}

    seen: list[dict[str, Any]] = []
    turn = session.follow_turn(thread_id, turn_id, timeout=40, on_message=seen.append, on_server_request=accept)

    assert [r["method"] for r in asked] == ["item/commandExecution/requestApproval"], asked
    params = asked[0]["params"]
    assert params["threadId"] == thread_id and params["turnId"] == turn_id
    assert "uname -s" in params["command"]
    assert turn["status"] == "completed", turn
    assert agent_text(turn) == "donedone"
    commands = [m["params"]["item"] for m in seen if m.get("method") == "item/completed"
                and m["params"]["item"].get("type") == "commandExecution"]
    assert len(commands) == 1, commands
    assert commands[0]["status"] == "completed" and commands[0]["exitCode"] == 0, commands
    assert "Linux" in (commands[0].get("aggregatedOutput") or "")
    assert any(m.get("method") == "serverRequest/resolved" for m in seen)
    # codex ran the command and sent its output back to the model
    bodies = world.mock.wait_for_requests(2, timeout=5)
    outputs = [item for item in bodies[1]["input"] if item.get("type") == "function_call_output"]
    assert outputs and "Linux" in str(outputs[-1].get("output")), outputs
    finish_clean(world)


# -- 7 ---------------------------------------------------------------------------------------
def test_two_sessions_on_one_thread_get_their_own_notification_opt_outs(world):
    broker = world.ensure()
    loud = world.session(broker, name="loud")
    quiet = world.session(broker, name="quiet", opt_out=[DELTA])
    thread_id = start_thread(loud, world)
    # quiet subscribes by naming the thread (a read; it subscribes even if the read fails)
    try:
        quiet.request("thread/read", {"threadId": thread_id, "includeTurns": False}, timeout=10)
    except AppServerError as exc:
        report(f"opt-outs: thread/read before the first turn answered {exc}")
    turn_id = start_turn(loud, thread_id, "stream it reply=abc deltas=5")
    follow_loud = Follower(loud, thread_id, turn_id, timeout=30)
    follow_quiet = Follower(quiet, thread_id, turn_id, timeout=30)
    turn_loud, turn_quiet = follow_loud.wait(30), follow_quiet.wait(30)

    assert turn_loud["status"] == turn_quiet["status"] == "completed"
    assert agent_text(turn_loud) == agent_text(turn_quiet) == "abc" * 5
    assert deltas(follow_loud.messages, turn_id) == ["abc"] * 5
    assert [m for m in follow_quiet.messages if m.get("method") == DELTA] == []
    quiet_items = [m["params"]["item"] for m in follow_quiet.messages if m.get("method") == "item/completed"
                   and m["params"]["item"].get("type") == "agentMessage"]
    assert [item["text"] for item in quiet_items] == ["abc" * 5]
    opt_outs = {s.client_name: list(s.opt_out_notification_methods) for s in world.client(broker).status().sessions}
    assert opt_outs == {"loud": [], "quiet": [DELTA]}, opt_outs
    finish_clean(world)


# -- 3b: known bug, kept last so that `-x` runs everything else first ----------------------------
def test_stopped_native_codex_mid_turn_is_replaced_and_nothing_of_it_is_left(world, caplog, monkeypatch):
    """The motivating incident: codex wedges while a turn runs. The forced drain cannot end
    that turn (codex is not reading), so ensure escalates to SIGKILL; the whole old tree must
    still go, the stopped native codex included, and the turn's follower must not hang.

    The escalation kills the broker and the app-server's group one after the other; a busy
    machine can run the broker's death (and with it the launcher's parent-death signal) in
    between. That scheduling is made certain here by a short pause after any signal to the
    old broker itself, so the outcome does not depend on luck."""
    caplog.set_level(logging.INFO, logger="codex_broker.lifecycle")
    a = world.ensure()
    real_signal_verified = identity.signal_verified

    def slow_machine(pid: int, create_time: float, sig: int, **kw: Any) -> bool:
        sent = real_signal_verified(pid, create_time, sig, **kw)
        if pid == a.pid:
            time.sleep(0.3)
        return sent

    monkeypatch.setattr(identity, "signal_verified", slow_machine)
    tracked_a = world.tracked(a)
    tree_a = world.codex_tree(a)
    session = world.session(a)
    thread_id = start_thread(session, world)
    turn_id = start_turn(session, thread_id, "wedge me reply=w deltas=60 delay=0.5")
    follow = Follower(session, thread_id, turn_id, timeout=60)
    follow.wait_first_delta(20)

    t0 = time.monotonic()
    tree_a.native.send_signal(signal.SIGSTOP)
    wait_until(lambda: world.client(a).health() == "NOT_SERVING", 10, "NOT_SERVING after SIGSTOP mid-turn")
    not_serving_s = time.monotonic() - t0

    t1 = time.monotonic()
    b = world.ensure()
    ensure_s = time.monotonic() - t1
    assert b.verdict == "unhealthy" and b.pid != a.pid, b
    assert isinstance(follow.error_within(5), SessionClosed), follow.error
    report(f"hang mid-turn: NOT_SERVING {not_serving_s:.2f} s after SIGSTOP; ensure took {ensure_s:.2f} s "
           f"({escalation(caplog)})")
    world.assert_all_gone(tracked_a, 5.0, f"ensure replaced the broker whose codex wedged mid-turn "
                          f"(launcher pid {tree_a.launcher.pid}, native pid {tree_a.native.pid})")
    assert world.client(b).health() == "SERVING"
    finish_clean(world)
