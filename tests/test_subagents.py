"""Sub-agent routing: the messages of a thread that a turn spawned (its notifications and server
requests, nested sub-agents included) reach the Sessions that follow the spawning thread and no
one else, in the order codex writes them (the sub-agent's thread/started before the collab item
that links it); a sub-agent's turn is in flight; links are forgotten once nothing needs them.

The hub tests feed app-server lines by hand; the Session tests run the broker over gRPC with the
fake app-server's ``subagents=N`` turns."""
from __future__ import annotations

import asyncio
from typing import Any

from harness import SessionClient, aio_channel, notifications, run, status
from test_hub_routing import Harness, drain, line, note

from proxy import hub as hub_module
from proxy import jsonrpc


def thread_started(thread_id: str, **thread: Any) -> bytes:
    params = {"thread": {"id": thread_id, "agentNickname": "Scout", **thread}}
    return line({"method": "thread/started", "params": params})


def collab(sender: str, receivers: list[str], *, method: str = "item/started", tool: str = "spawnAgent") -> bytes:
    return note(method, sender, turnId=f"turn-{sender}", item={
        "type": "collabAgentToolCall", "id": f"call-{receivers}", "tool": tool, "status": "inProgress",
        "senderThreadId": sender, "receiverThreadIds": receivers, "agentsStates": {}})


def turn(method: str, thread_id: str, turn_id: str) -> bytes:
    return note(method, thread_id, turn={"id": turn_id, "status": "inProgress"})


def delta(thread_id: str, text: str) -> bytes:
    return note("item/agentMessage/delta", thread_id, turnId="t", itemId="i", delta=text)


def spawn_in_codex_order(parent: str, child: str) -> list[bytes]:
    """What codex writes when a turn on ``parent`` spawns ``child`` (no parent field)."""
    return [thread_started(child), turn("turn/started", parent, f"turn-{parent}"), collab(parent, [child])]


def summary(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    out = []
    for m in messages:
        if "method" not in m:
            continue  # a response
        params = m.get("params", {})
        out.append((m["method"], params.get("threadId") or params.get("thread", {}).get("id")))
    return out


def test_a_sub_agents_messages_reach_only_the_session_whose_turn_spawned_it():
    h = Harness()
    mine, other = h.session_on("thr-p"), h.session_on("thr-o")
    h.hub.from_app_server_lines([*spawn_in_codex_order("thr-p", "sub-1"), turn("turn/started", "sub-1", "st1")])
    assert ("sub-1", "st1") in h.hub.turns  # in flight though no Session asked for sub-1
    h.hub.from_app_server_lines([delta("sub-1", "a"), delta("thr-o", "o"), delta("sub-1", "b"),
                                 turn("turn/completed", "sub-1", "st1")])
    assert ("sub-1", "st1") not in h.hub.turns
    assert summary(drain(mine)) == [
        ("thread/started", "sub-1"), ("turn/started", "thr-p"), ("item/started", "thr-p"),
        ("turn/started", "sub-1"), ("item/agentMessage/delta", "sub-1"), ("item/agentMessage/delta", "sub-1"),
        ("turn/completed", "sub-1")]
    # the parentless thread/started has no thread to route by: every Session, as before
    assert summary(drain(other)) == [("thread/started", "sub-1"), ("item/agentMessage/delta", "thr-o")]


def test_a_sub_agents_messages_before_the_item_that_links_it_reach_the_spawner_in_order():
    """codex 0.169's order: the collab item starts with no receiver, the sub-agent runs, and
    only the item's completion names it; no thread/started for it at all."""
    h = Harness()
    mine, other = h.session_on("thr-p"), h.session_on("thr-o")
    h.hub.from_app_server_lines([turn("turn/started", "thr-p", "turn-thr-p"), collab("thr-p", []),
                                 note("thread/status/changed", "sub-1", status={"type": "active"}),
                                 turn("turn/started", "sub-1", "st1"), delta("thr-o", "o"), delta("sub-1", "early")])
    assert ("sub-1", "st1") in h.hub.turns
    assert summary(drain(mine)) == [("turn/started", "thr-p"), ("item/started", "thr-p")]
    h.hub.from_app_server_lines([collab("thr-p", ["sub-1"], method="item/completed"), delta("sub-1", "late")])
    assert summary(drain(mine)) == [("thread/status/changed", "sub-1"), ("turn/started", "sub-1"),
                                    ("item/agentMessage/delta", "sub-1"), ("item/completed", "thr-p"),
                                    ("item/agentMessage/delta", "sub-1")]
    assert summary(drain(other)) == [("item/agentMessage/delta", "thr-o")]
    assert not any(entry[0] == "sub-1" for entry in h.hub._orphans)


def test_notifications_no_session_follows_are_kept_only_up_to_the_ring_bound():
    h = Harness()
    h.hub.from_app_server_lines([delta(f"gone-{i % 7}", "x" * 100) for i in range(5000)])
    assert len(h.hub._orphans) == hub_module.ORPHAN_MESSAGES
    h.hub.from_app_server_lines([delta("gone-big", "y" * (hub_module.ORPHAN_BYTES // 3)) for _ in range(5)])
    assert h.hub._orphan_bytes == sum(len(entry[2]) for entry in h.hub._orphans) <= hub_module.ORPHAN_BYTES


def test_nested_sub_agents_reach_the_root_threads_session():
    h = Harness()
    root, other = h.session_on("thr-r"), h.session_on("thr-o")
    h.hub.from_app_server_lines([*spawn_in_codex_order("thr-r", "sub-1"), turn("turn/started", "sub-1", "st1"),
                                 thread_started("sub-2"), collab("sub-1", ["sub-2"]),
                                 turn("turn/started", "sub-2", "st2"), delta("sub-2", "deep")])
    got = drain(root)
    assert ("item/agentMessage/delta", "sub-2") in summary(got) and ("item/started", "sub-1") in summary(got)
    assert [m for m in summary(drain(other)) if m[1] != "thr-o"] == [("thread/started", "sub-1"),
                                                                   ("thread/started", "sub-2")]
    assert h.hub.parents == {"sub-1": "thr-r", "sub-2": "sub-1"}
    assert {("sub-1", "st1"), ("sub-2", "st2")} <= set(h.hub.turns)


def test_a_thread_started_that_names_its_parent_goes_to_the_parents_followers_only():
    h = Harness()
    mine, other = h.session_on("thr-p"), h.session_on("thr-o")
    h.hub.from_app_server_lines([thread_started("sub-a", parentThreadId="thr-p")])
    h.hub.from_app_server_lines([thread_started("sub-b", parentThreadId=None, source={
        "subAgent": {"thread_spawn": {"parent_thread_id": "thr-p", "depth": 1}}})])
    h.hub.from_app_server_lines([delta("sub-a", "x"), delta("sub-b", "y")])
    assert summary(drain(mine)) == [("thread/started", "sub-a"), ("thread/started", "sub-b"),
                                    ("item/agentMessage/delta", "sub-a"), ("item/agentMessage/delta", "sub-b")]
    assert drain(other) == []


def test_a_sub_agents_server_request_goes_to_the_parents_session_and_its_answer_to_the_app_server():
    h = Harness()
    mine, other = h.session_on("thr-p"), h.session_on("thr-o")
    h.hub.from_app_server_lines([*spawn_in_codex_order("thr-p", "sub-1"),
                                 line({"id": 7, "method": "item/commandExecution/requestApproval",
                                       "params": {"threadId": "sub-1", "turnId": "st1", "command": "ls"}})])
    asked = drain(mine)[-1]
    assert asked["method"] == "item/commandExecution/requestApproval" and asked["params"]["threadId"] == "sub-1"
    assert all("id" not in m for m in drain(other))
    h.from_client(mine, {"id": asked["id"], "result": {"decision": "accept"}})
    assert h.sent[-1] == {"id": 7, "result": {"decision": "accept"}}


def test_a_session_that_resumes_the_parent_later_gets_its_sub_agents_messages():
    h = Harness()
    first = h.session_on("thr-p")
    h.hub.from_app_server_lines([*spawn_in_codex_order("thr-p", "sub-1"), thread_started("sub-2"),
                                 collab("sub-1", ["sub-2"])])
    h.hub.close_session(first)
    later = h.hub.open_session()
    h.from_client(later, {"id": 1, "method": "initialize", "params": {}})
    h.from_client(later, {"id": 2, "method": "thread/resume", "params": {"threadId": "thr-p"}})
    h.hub.from_app_server_lines([line({"id": h.sent[-1]["id"], "result": {"thread": {"id": "thr-p"}}})])
    drain(later)
    h.hub.from_app_server_lines([turn("turn/started", "sub-2", "st2"), delta("sub-1", "one"), delta("sub-2", "two")])
    assert summary(drain(later)) == [("turn/started", "sub-2"), ("item/agentMessage/delta", "sub-1"),
                                     ("item/agentMessage/delta", "sub-2")]


def test_a_collab_call_that_spawns_nothing_does_not_hand_over_another_clients_thread():
    """sendInput / wait address threads the sender did not spawn: no link, and a thread that
    already has a parent keeps it (the first link wins, a cycle is refused)."""
    h = Harness()
    mine, other = h.session_on("thr-p"), h.session_on("thr-o")
    h.hub.from_app_server_lines([collab("thr-p", ["thr-o"], tool="sendInput"),
                                 *spawn_in_codex_order("thr-o", "sub-o"),
                                 collab("thr-p", ["sub-o"], method="item/completed", tool="resumeAgent"),
                                 collab("sub-o", ["thr-o"]),
                                 delta("thr-o", "theirs"), delta("sub-o", "theirs too")])
    assert h.hub.parents == {"sub-o": "thr-o"}
    assert [m for m in summary(drain(mine)) if m[0] != "thread/started" and m[1] != "thr-p"] == []
    assert ("item/agentMessage/delta", "sub-o") in summary(drain(other))


def test_a_big_collab_item_links_its_sub_agent_from_the_envelope():
    h = Harness()
    mine = h.session_on("thr-p")
    big = line({"method": "item/started", "params": {"threadId": "thr-p", "item": {
        "type": "collabAgentToolCall", "tool": "spawnAgent", "prompt": "p" * (1 << 20),
        "senderThreadId": "thr-p", "receiverThreadIds": ["sub-big"]}}})
    h.hub.from_app_server_lines([big])  # a line that big comes alone
    h.hub.from_app_server_lines([delta("sub-big", "x")])
    assert summary(drain(mine)) == [("item/started", "thr-p"), ("item/agentMessage/delta", "sub-big")]


def test_links_are_forgotten_when_the_parents_sessions_are_gone_and_no_turn_runs_in_the_tree():
    h = Harness()
    mine = h.session_on("thr-p")
    h.hub.from_app_server_lines([*spawn_in_codex_order("thr-p", "sub-1"), turn("turn/started", "sub-1", "st1"),
                                 thread_started("sub-2"), collab("sub-1", ["sub-2"])])
    h.hub.close_session(mine)
    assert h.hub.parents == {"sub-1": "thr-p", "sub-2": "sub-1"}  # sub-1's turn still runs
    assert ("sub-1", "st1") in h.hub.turns
    h.hub.from_app_server_lines([turn("turn/completed", "sub-1", "st1")])
    assert h.hub.parents == {"sub-1": "thr-p", "sub-2": "sub-1"}  # the spawning turn still runs
    h.hub.from_app_server_lines([turn("turn/completed", "thr-p", "turn-thr-p")])
    assert h.hub.parents == {} and h.hub.children == {} and h.hub.threads == {} and h.hub.turns == {}


def test_links_under_a_thread_no_session_follows_are_forgotten_when_its_turn_completes():
    h = Harness()
    for i in range(50):
        parent, child = f"thr-{i}", f"sub-{i}"
        h.hub.from_app_server_lines([*spawn_in_codex_order(parent, child), turn("turn/started", child, "st"),
                                     turn("turn/completed", child, "st")])
        assert h.hub.parents == {child: parent}  # the spawning turn still runs
        h.hub.from_app_server_lines([turn("turn/completed", parent, f"turn-{parent}")])
    assert h.hub.parents == {} and h.hub.children == {} and h.hub.turns == {}


def test_lineage_is_read_the_same_from_decoded_params_and_from_the_envelope():
    cases = [
        ("thread/started", {"thread": {"id": "c", "parentThreadId": "p"}}, [("c", "p")]),
        ("thread/started", {"thread": {"id": "c", "source": {"subAgent": {"thread_spawn": {"parent_thread_id": "p"}}}}},
         [("c", "p")]),
        ("thread/started", {"thread": {"id": "c", "source": "vscode"}}, []),
        ("thread/started", {"thread": {"id": "c", "parentThreadId": "c"}}, []),
        ("item/started", {"item": {"type": "collabAgentToolCall", "senderThreadId": "p",
                                   "receiverThreadIds": ["a", "p", 3, "b"]}}, [("a", "p"), ("b", "p")]),
        ("item/completed", {"item": {"type": "collabAgentToolCall", "tool": "wait", "senderThreadId": "p",
                                     "receiverThreadIds": ["a"]}}, []),
        ("item/started", {"item": {"type": "agentMessage", "senderThreadId": "p", "receiverThreadIds": ["a"]}}, []),
        ("item/started", {"item": "collabAgentToolCall"}, []),
        ("turn/started", {"thread": {"id": "c", "parentThreadId": "p"}}, []),
    ]
    for method, params, expected in cases:
        assert jsonrpc.spawned_threads(method, params) == expected, (method, params)
        assert jsonrpc.spawned_threads_raw(method, jsonrpc.envelope(jsonrpc.dumps({"params": params}))["params"]) \
            == expected, (method, params)


# -- through the broker, over gRPC -------------------------------------------------------------
def sub_agent_threads(messages: list[Any]) -> list[str]:
    """The sub-agent threads the collab items among ``messages`` spawned, in order."""
    found = []
    for m in notifications(messages, "item/started"):
        item = m["params"].get("item", {})
        if item.get("type") == "collabAgentToolCall":
            found.extend(item["receiverThreadIds"])
    return found


def deltas_in(messages: list[Any]) -> list[tuple[str, str]]:
    return [(m["params"]["threadId"], m["params"]["delta"]) for m in notifications(messages, "item/agentMessage/delta")]


def test_sessions_get_their_own_nested_sub_agents_and_their_approvals_and_not_each_others(broker):
    b = broker()

    async def main() -> tuple[list[Any], list[Any], str, str]:
        async with aio_channel(b) as channel, SessionClient(channel) as a, SessionClient(channel) as c:
            await asyncio.gather(a.initialize(), c.initialize())
            thread_a, thread_c = await asyncio.gather(a.start_thread(), c.start_thread())
            turn_a = await a.start_turn(thread_a, "deltas=2 subagents=2 subdeltas=3 subapprove=1")
            asked = (await a.until(lambda m: m.get("method") == "item/commandExecution/requestApproval"))[-1]
            turn_c = await c.start_turn(thread_c, "deltas=2 subagents=1 subdeltas=4 subparent=1")
            await c.turn_completed(thread_c, turn_c)
            await a.respond(asked["id"], {"decision": "accept"})
            await a.turn_completed(thread_a, turn_a)
            assert list((await status(channel)).in_flight_turns) == []  # the sub-agents' turns ended too
            return a.messages, c.messages, thread_a, thread_c

    a_msgs, c_msgs, thread_a, thread_c = run(main())
    subs_a, subs_c = sub_agent_threads(a_msgs), sub_agent_threads(c_msgs)
    assert len(subs_a) == 2 and len(subs_c) == 1
    asked = [m for m in a_msgs if m.get("method") == "item/commandExecution/requestApproval"]
    assert [m["params"]["threadId"] for m in asked] == [subs_a[1]]  # the nested sub-agent's approval
    deltas_a = deltas_in(a_msgs)
    assert deltas_a == [(subs_a[1], "decision=accept "), *[(subs_a[1], f"s{i} ") for i in range(3)],
                        *[(subs_a[0], f"s{i} ") for i in range(3)], (thread_a, "w0 "), (thread_a, "w1 ")]
    deltas_c = deltas_in(c_msgs)
    assert deltas_c == [*[(subs_c[0], f"s{i} ") for i in range(4)], (thread_c, "w0 "), (thread_c, "w1 ")]
    # c's sub-agent named its parent: a never heard of it; a's did not: c got only their thread/started
    mentioned_by_c = {m["params"].get("threadId") for m in c_msgs if "params" in m} - {None}
    assert mentioned_by_c == {thread_c, subs_c[0]}
    assert {m["params"]["thread"]["id"] for m in notifications(c_msgs, "thread/started")} >= set(subs_a)
    assert all(subs_c[0] not in str(m) for m in a_msgs)
    assert [m["params"]["thread"]["agentNickname"] for m in notifications(a_msgs, "thread/started")
            if m["params"]["thread"]["id"] in subs_a] == ["Scout-1", "Scout-2"]


def test_a_sub_agents_running_turn_is_in_flight_in_the_brokers_status(broker):
    """While the sub-agent waits on its approval, Status lists its turn beside the parent's."""
    b = broker()

    async def main() -> tuple[set[tuple[str, str]], str, str, set[tuple[str, str]]]:
        async with aio_channel(b) as channel, SessionClient(channel) as a:
            await a.initialize()
            thread_a = await a.start_thread()
            turn_a = await a.start_turn(thread_a, "deltas=1 subagents=1 subapprove=1")
            asked = (await a.until(lambda m: m.get("method") == "item/commandExecution/requestApproval"))[-1]
            busy = await status(channel)
            await a.respond(asked["id"], {"decision": "decline"})
            await a.turn_completed(thread_a, turn_a)
            idle = await status(channel)
            return ({(t.thread_id, t.turn_id) for t in busy.in_flight_turns}, thread_a, asked["params"]["threadId"],
                    {(t.thread_id, t.turn_id) for t in idle.in_flight_turns})

    busy, parent, sub, idle = run(main())
    assert {thread for thread, _ in busy} == {parent, sub}
    assert idle == set()


def test_a_half_closed_spawner_ends_only_after_its_sub_agents_turn_completes():
    h = Harness()
    mine = h.session_on("thr-p")
    h.from_client(mine, {"id": 3, "method": "turn/start", "params": {"threadId": "thr-p", "input": []}})
    h.hub.from_app_server_lines([line({"id": h.sent[-1]["id"], "result": {"turn": {"id": "turn-thr-p"}}})])
    h.hub.from_app_server_lines([collab("thr-p", []), turn("turn/started", "sub-1", "st1"),
                                 collab("thr-p", ["sub-1"], method="item/completed"),
                                 thread_started("sub-2", parentThreadId="sub-1"), turn("turn/started", "sub-2", "st2")])
    assert h.hub.turns[("sub-1", "st1")].owner is mine and h.hub.turns[("sub-2", "st2")].owner is mine
    h.hub.half_close(mine)
    h.hub.from_app_server_lines([turn("turn/completed", "thr-p", "turn-thr-p"), turn("turn/completed", "sub-1", "st1")])
    assert mine.open  # the nested sub-agent still runs
    h.hub.from_app_server_lines([delta("sub-2", "last"), turn("turn/completed", "sub-2", "st2")])
    assert not mine.open
    assert summary(drain(mine))[-2:] == [("item/agentMessage/delta", "sub-2"), ("turn/completed", "sub-2")]
