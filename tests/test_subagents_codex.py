"""Sub-agent routing with the REAL ``codex app-server``: the mock answers a turn with a
``spawn_agent`` call (``spawn=1``), codex spawns a sub-agent thread, and its messages reach the
Session whose turn spawned it and no other Session of the same broker.

What codex 0.169 writes for it (see tests/codex_protocol_notes.md): on the parent thread an
``item/started`` collabAgentToolCall with no receivers yet, then its ``item/completed`` naming the
sub-agent in ``receiverThreadIds`` (the sub-agent's first messages can come before it); no
thread/started for the sub-agent; then the sub-agent's own turn, which may end after the parent's
and here asks for a command approval on its own thread."""
from __future__ import annotations

from typing import Any

import pytest
from codex_support import CodexWorld, agent_text, text_input
from mock_responses import MockResponses

from lifecycle.errors import CallTimeout

pytestmark = [pytest.mark.codex, pytest.mark.timeout(90)]

DELTA = "item/agentMessage/delta"


@pytest.fixture
def world(tmp_path):
    with MockResponses() as mock:
        w = CodexWorld(tmp_path, mock)
        try:
            yield w
        finally:
            problems = w.finish()
    assert not problems, "\n".join(problems) + "\n" + w.log_tails()


def start_turn(session: Any, thread_id: str, prompt: str) -> str:
    result = session.request("turn/start", {"threadId": thread_id, "input": text_input(prompt)}, timeout=30)
    return result["turn"]["id"]  # type: ignore[no-any-return]


def spawned(messages: list[dict[str, Any]]) -> list[str]:
    return [t for m in messages if m.get("method") == "item/completed"
            and m["params"]["item"].get("type") == "collabAgentToolCall"
            for t in m["params"]["item"]["receiverThreadIds"]]


def drained(session: Any) -> list[dict[str, Any]]:
    """What the Session has already received and not yet read."""
    out = []
    while True:
        try:
            out.append(session.next_message(timeout=0))
        except CallTimeout:
            return out


def test_real_codex_sub_agent_reaches_the_spawning_session_and_not_a_bystander(world: CodexWorld):
    broker = world.ensure()
    spawner = world.session(broker, name="spawner")
    bystander = world.session(broker, name="bystander")
    thread_s = spawner.request("thread/start", {"cwd": str(world.workspace)}, timeout=30)["thread"]["id"]
    thread_b = bystander.request("thread/start", {"cwd": str(world.workspace)}, timeout=30)["thread"]["id"]

    turn_s = start_turn(spawner, thread_s, "delegate spawn=1 subapprove=1 subreply=sub subdeltas=3 reply=top deltas=1")
    seen: list[dict[str, Any]] = []
    asked: list[dict[str, Any]] = []

    def accept(request: dict[str, Any]) -> Any:
        asked.append(request)
        return {"decision": "accept"}

    parent = spawner.follow_turn(thread_s, turn_s, timeout=60, on_message=seen.append, on_server_request=accept)
    assert parent["status"] == "completed" and agent_text(parent) == "top"
    (sub,) = spawned(seen)
    if not any(m.get("method") == "turn/completed" and m["params"]["threadId"] == sub for m in seen):
        # the sub-agent's turn may end after its parent's
        spawner.follow_turn(sub, timeout=60, on_message=seen.append, on_server_request=accept)
    (child,) = [m["params"]["turn"] for m in seen if m.get("method") == "turn/completed"
                and m["params"]["threadId"] == sub]
    assert child["status"] == "completed", child
    # the sub-agent's command approval was asked of the spawner, on the sub-agent's thread
    assert [(r["method"], r["params"]["threadId"]) for r in asked] == [("item/commandExecution/requestApproval", sub)]
    commands = [m["params"]["item"] for m in seen if m.get("method") == "item/completed"
                and m["params"]["item"].get("type") == "commandExecution"]
    assert [(c["status"], c["exitCode"]) for c in commands] == [("completed", 0)], commands

    assert [m["params"]["delta"] for m in seen if m.get("method") == DELTA and m["params"]["threadId"] == sub] \
        == ["sub"] * 3
    assert any(m.get("method") == "turn/started" and m["params"]["threadId"] == sub for m in seen)

    # the bystander's own turn, then a round trip: whatever the hub routed to it before that
    # answer (the sub-agent's messages were routed earlier) is already in its queue
    turn_b = start_turn(bystander, thread_b, "mine reply=own deltas=1")
    heard: list[dict[str, Any]] = []
    own = bystander.follow_turn(thread_b, turn_b, timeout=60, on_message=heard.append)
    assert own["status"] == "completed" and agent_text(own) == "own"
    bystander.request("thread/loaded/list", {}, timeout=30)
    heard += drained(bystander)
    assert any(m.get("method") == DELTA for m in heard)  # it did hear its own turn
    assert [m for m in heard if sub in str(m)] == []
    assert list(world.client(broker).status().in_flight_turns) == []  # the sub-agent's turn ended too
