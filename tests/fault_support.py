"""Helpers for the soak and access tests (test_soak.py, test_access.py); broker processes
and Session clients come from harness.py.

- ``Ledger`` and ``RecordingSession``: the soak's accounting, one entry per request id and per
  turn, fed by every message a lifecycle ``Session`` receives.
- ``OtherUser``: run a small program as another local user (for the access tests).
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import threading
from typing import Any

import grpc
from harness import ROOT

from lifecycle.client import Session as LifecycleSession
from protos import broker_pb2_grpc


# -- the soak's accounting ------------------------------------------------------------------
class Ledger:
    """Every request id, response, turn and turn/completed the soak's clients saw, thread-safe.

    Session request ids are global (one counter for every Session of every broker), so a
    response counted twice for one id is a duplicate wherever it came from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.sent: dict[int, dict[str, Any]] = {}  # request id -> {method, instance, outcome}
        self.responses: collections.Counter[Any] = collections.Counter()  # request id -> responses received
        self.turns: dict[tuple[str, str], dict[str, Any]] = {}  # (instance, turn id) -> facts
        self.turn_completed: collections.Counter[tuple[str, str]] = collections.Counter()
        self.retryable: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []  # anything that is neither a response nor a retryable error
        self.events: collections.Counter[str] = collections.Counter()

    def note_sent(self, req_id: int, method: str, instance: str) -> None:
        with self.lock:
            self.sent[req_id] = {"method": method, "instance": instance, "outcome": None}

    def note_response(self, req_id: Any) -> None:
        with self.lock:
            self.responses[req_id] += 1
            if req_id not in self.sent:
                self.problems.append(f"response for an id never sent: {req_id!r}")

    def note_turn_completed(self, instance: str, turn_id: Any, status: Any) -> None:
        with self.lock:
            self.turn_completed[(instance, str(turn_id))] += 1

    def outcome(self, req_id: int | None, outcome: str) -> None:
        with self.lock:
            if req_id is not None and req_id in self.sent:
                self.sent[req_id]["outcome"] = outcome

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.events[name] += n

    def retry(self, kind: str) -> None:
        with self.lock:
            self.retryable[kind] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


class _IdSource:
    """Hands a Session its request ids from the ledger's global counter and records each one."""

    def __init__(self, session: RecordingSession):
        self._session = session

    def __iter__(self) -> _IdSource:
        return self

    def __next__(self) -> int:
        s = self._session
        req_id = next(s.ledger.ids)
        s.last_id = req_id
        s.ledger.note_sent(req_id, s.next_method, s.instance)
        return req_id


class RecordingSession(LifecycleSession):
    """The lifecycle client's Session, with every received message counted in a Ledger:
    responses by request id, ``turn/completed`` by (broker instance, turn id)."""

    def __init__(self, channel: grpc.Channel, ledger: Ledger, instance: str):
        self.ledger = ledger
        self.instance = instance
        self.last_id: int | None = None
        self.next_method = ""
        super().__init__(broker_pb2_grpc.AppServerStub(channel))
        self._ids = _IdSource(self)  # type: ignore[assignment]

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "method" not in msg and "id" in msg:
            self.ledger.note_response(msg["id"])
        elif msg.get("method") == "turn/completed":
            turn = (msg.get("params") or {}).get("turn") or {}
            self.ledger.note_turn_completed(self.instance, turn.get("id"), turn.get("status"))
        super()._dispatch(msg)

    def tracked_request(self, method: str, params: Any = None, timeout: float | None = 60.0) -> tuple[int | None, Any]:
        """``request`` that also returns the id it used (None: it never left the client)."""
        self.last_id = None
        self.next_method = method
        try:
            result = self.request(method, params, timeout=timeout)
        except BaseException as exc:
            exc.request_id = self.last_id  # type: ignore[attr-defined]
            raise
        return self.last_id, result


# -- another local user -----------------------------------------------------------------------
OTHER_USER = "cxbtest"


def _passwordless_sudo() -> bool:
    if shutil.which("sudo") is None:
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
CONNECT_PROBE = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print(json.dumps({"connected": True}))
except OSError as exc:
    print(json.dumps({"connected": False, "errno": exc.errno, "error": str(exc)}))
"""
GRPC_PROBE = r"""
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos import broker_pb2, broker_pb2_grpc
out = {}
with grpc.insecure_channel(sys.argv[1]) as channel:
    for name, rpc in (("health", lambda: health_pb2_grpc.HealthStub(channel).Check(
                          health_pb2.HealthCheckRequest(), timeout=5)),
                      ("call", lambda: broker_pb2_grpc.AppServerStub(channel).Call(
                          broker_pb2.CallRequest(method="thread/loaded/list"), timeout=5)),
                      ("status", lambda: broker_pb2_grpc.BrokerStub(channel).Status(
                          broker_pb2.StatusRequest(), timeout=5))):
        try:
            rpc()
            out[name] = {"ok": True}
        except grpc.RpcError as exc:
            out[name] = {"ok": False, "code": exc.code().name, "details": exc.details()}
print(json.dumps(out))
"""


class OtherUser:
    """Runs small Python programs as another, unprivileged local user.

    As root: the user is created if missing (no home, no login shell) and programs run with
    its uid/gid and no supplementary groups (Popen user/group/extra_groups: set in C between
    fork and exec). Not root: through passwordless sudo, or ``available`` is False with a
    reason (the caller must fail, not skip)."""

    def __init__(self, name: str = OTHER_USER):
        self.name = name
        self.reason = ""
        self.python: str | None = None
        self.uid = self.gid = -1
        self.sudo = os.geteuid() != 0
        if self.sudo and not _passwordless_sudo():
            self.reason = ("proving that another local user cannot connect needs a second user: run the tests "
                           "as root (as CI does) or with passwordless sudo")
            return
        self._ensure_user()
        if not self.reason:
            self.python = self._find_python()

    @property
    def available(self) -> bool:
        return not self.reason

    def _root(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run((["sudo", "-n"] if self.sudo else []) + argv, capture_output=True, text=True,
                              timeout=60)

    def _ensure_user(self) -> None:
        try:
            entry = pwd.getpwnam(self.name)
        except KeyError:
            done = self._root(["useradd", "--system", "--no-create-home", "--user-group",
                               "--shell", "/usr/sbin/nologin", self.name])
            if done.returncode != 0:
                self.reason = f"could not create user {self.name}: {done.stderr.strip()}"
                return
            entry = pwd.getpwnam(self.name)
        if entry.pw_uid == os.geteuid() or entry.pw_uid == 0:
            self.reason = f"user {self.name} is not a different unprivileged user (uid {entry.pw_uid})"
            return
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", **(env or {})}
        if self.sudo:
            sets = [f"{k}={v}" for k, v in env.items()]
            return subprocess.run(["sudo", "-n", "-u", self.name, "--", "env", "-i", *sets, *argv],
                                  capture_output=True, text=True, timeout=timeout, cwd="/")
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/", env=env,
                              user=self.uid, group=self.gid, extra_groups=[])

    def _find_python(self) -> str | None:
        """An interpreter this user can execute (the venv's may live under an unreadable home)."""
        for candidate in dict.fromkeys([sys.executable, sys._base_executable,  # type: ignore[attr-defined]
                                        "/usr/bin/python3", shutil.which("python3") or ""]):
            try:
                if candidate and self.run([candidate, "-c", "print('ok')"]).stdout.strip() == "ok":
                    return candidate
            except OSError:  # not executable by this user (e.g. under a 0700 home)
                continue
        self.reason = f"no Python interpreter is executable by user {self.name}"
        return None

    def connect(self, path: str) -> dict[str, Any]:
        """A raw connect() to the unix socket ``path`` as this user."""
        assert self.python is not None
        done = self.run([self.python, "-c", CONNECT_PROBE, path])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def grpc_env(self) -> dict[str, str] | None:
        """PYTHONPATH giving this user's interpreter grpcio and the project, if it can import them."""
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(ROOT)}
        env = {"PYTHONPATH": os.pathsep.join(sorted(paths))}
        assert self.python is not None
        done = self.run([self.python, "-c", "import grpc, grpc_health.v1.health_pb2, protos.broker_pb2"], env=env)
        return env if done.returncode == 0 else None

    def grpc_rpcs(self, endpoint: str, env: dict[str, str]) -> dict[str, Any]:
        """Health, Call and Status against ``endpoint`` as this user; each outcome."""
        assert self.python is not None
        done = self.run([self.python, "-c", GRPC_PROBE, endpoint], env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]
