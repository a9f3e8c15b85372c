"""``codex-broker gc``: stop this user's orphaned brokers and remove dead session directories.

An orphan is a broker that listens in this user's runtime directory (so a lifecycle spawned
it) but that no workspace record names any more. Brokers draining on purpose (rotated ones
finishing their turns) are left alone; a SERVING orphan is asked to drain, which lets any turn
it still runs finish; one that does not answer is killed, after its identity (pid + create
time, read together) is verified again. Hand-started brokers elsewhere are never touched."""
from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from lifecycle import identity
from lifecycle.client import BrokerClient
from lifecycle.errors import BrokerError
from lifecycle.spawn import runtime_dir
from lifecycle.state import WorkspaceState, state_root


def _flag(cmdline: list[str], name: str) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def broker_processes(runtime: Path) -> list[dict[str, Any]]:
    """This user's broker processes listening under ``runtime``."""
    found = []
    uid = os.getuid()
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "create_time", "status"]):
        info = proc.info
        cmdline = info.get("cmdline") or []
        if not info.get("uids") or info["uids"].real != uid or "serve" not in cmdline:
            continue
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        endpoint = _flag(cmdline, "--endpoint")
        if not endpoint or not endpoint.startswith(f"unix:{runtime}/"):
            continue
        found.append({"pid": info["pid"], "create_time": info["create_time"], "endpoint": endpoint,
                      "instance_id": _flag(cmdline, "--instance-id") or "",
                      "session_dir": os.path.dirname(endpoint[len("unix:"):])})
    return found


def recorded_instances(root: Path) -> set[str]:
    instances = set()
    workspaces = root / "workspaces"
    if workspaces.is_dir():
        for path in workspaces.iterdir():
            if (path / "broker.json").exists():
                record = WorkspaceState(path).read()
                if record is not None:
                    instances.add(record.instance_id)
    return instances


def collect(env: Mapping[str, str], *, dry_run: bool = False) -> dict[str, Any]:
    runtime = runtime_dir(env)
    recorded = recorded_instances(state_root(env))
    brokers = broker_processes(runtime)
    actions: list[str] = []
    for broker in brokers:
        if broker["instance_id"] in recorded:
            continue
        actions.append(_collect_broker(broker, dry_run))
    live_dirs = {b["session_dir"] for b in brokers}
    for path in sorted(runtime.iterdir()):
        if str(path) in live_dirs or not path.is_dir() or path.is_symlink():
            continue
        actions.append(f"{'would remove' if dry_run else 'removed'} dead session directory {path}")
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    return {"runtime_dir": str(runtime), "brokers": len(brokers), "actions": actions}


def _collect_broker(broker: dict[str, Any], dry_run: bool) -> str:
    pid, create_time = broker["pid"], broker["create_time"]
    try:
        with BrokerClient(broker["endpoint"]) as client:
            status = client.status(timeout=2.0)
            if status.instance_id and broker["instance_id"] and status.instance_id != broker["instance_id"]:
                return f"left broker pid {pid} alone: its endpoint answers for another instance"
            state = status.state
            from protos import broker_pb2

            if state in (broker_pb2.BROKER_STATE_DRAINING, broker_pb2.BROKER_STATE_STOPPING):
                return f"left orphaned broker pid {pid} alone: it is draining and will exit by itself"
            if dry_run:
                return f"would drain orphaned broker pid {pid} ({broker['endpoint']})"
            client.drain(0.0, reason="codex-broker gc: orphaned (no workspace records it)")
            return f"asked orphaned broker pid {pid} to drain ({broker['endpoint']})"
    except BrokerError:
        pass
    if dry_run:
        return f"would kill unresponsive orphaned broker pid {pid}"
    if identity.signal_verified(pid, create_time, signal.SIGKILL, group=True):
        identity.wait_gone(pid, create_time, 5.0)
        shutil.rmtree(broker["session_dir"], ignore_errors=True)
        return f"killed unresponsive orphaned broker pid {pid}"
    return f"broker pid {pid} was already gone"
