"""Where spawned brokers live and what spawn cleans up after them.

- The runtime directory: another local user cannot lock this user out by creating
  ``/tmp/codex-broker-<uid>`` first (or making it a symlink, or opening its mode): the lifecycle
  falls back, deterministically for every caller of this user, to a private directory whose name
  no other user can know, short enough for unix socket paths, and says so in the log. An explicit
  ``CODEX_BROKER_RUNTIME_DIR`` that is not private is still refused.
- Log pruning keeps the newest logs, and never deletes the log of a broker still running (here:
  one that is draining its turn after a rotation)."""
from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_support import World, process, world_for

from lifecycle.ensure import rotate_broker
from lifecycle.errors import StateError
from lifecycle.settings import Settings
from proxy.contract import MAX_SOCKET_PATH

SQUATS = ["open-mode", "symlink"] + (["other-owner"] if os.getuid() == 0 else [])


def squat(path: Path, how: str, tmp_path: Path) -> None:
    """Make ``path`` what another user could have made it."""
    if how == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        path.symlink_to(target)
        return
    path.mkdir(mode=0o700)
    if how == "open-mode":
        path.chmod(0o777)
    else:
        os.chown(path, 65534, 65534)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """Stands in for /tmp: short, so socket paths fit."""
    path = tmp_path / "t"
    path.mkdir()
    return path


def settings(base: Path, tmp_path: Path) -> Settings:
    return Settings.from_env({"CODEX_BROKER_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)},
                             tmp_base=base)


@pytest.mark.parametrize("how", SQUATS)
def test_a_squatted_default_runtime_dir_falls_back_to_the_same_private_dir_for_every_caller(
        how: str, base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    default = base / f"codex-broker-{os.getuid()}"
    squat(default, how, tmp_path)

    with caplog.at_level(logging.WARNING, logger="codex_broker.lifecycle"):
        first = settings(base, tmp_path).runtime_dir()
    again = settings(base, tmp_path).runtime_dir()

    assert first == again, "two callers of this user found different runtime dirs"
    assert first.parent == base and first.name.startswith(f"codex-broker-{os.getuid()}-") and first != default
    st = first.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert len(f"{first}/0123abcd/s.sock".encode()) <= MAX_SOCKET_PATH
    warnings = [r.getMessage() for r in caplog.records if r.name == "codex_broker.lifecycle"]
    assert len(set(warnings)) == 1 and str(default) in warnings[0] and str(first) in warnings[0], warnings
    assert os.path.lexists(default), "the squatted path was touched"


def test_an_unsquatted_default_runtime_dir_is_used_and_made_private(base: Path, tmp_path: Path) -> None:
    path = settings(base, tmp_path).runtime_dir()
    assert path == base / f"codex-broker-{os.getuid()}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_an_explicit_runtime_dir_that_is_not_private_is_refused(tmp_path: Path) -> None:
    explicit = tmp_path / "rt"
    explicit.mkdir(mode=0o700)
    explicit.chmod(0o755)
    with pytest.raises(StateError, match="unsafe runtime directory"):
        Settings.from_env({"CODEX_BROKER_RUNTIME_DIR": str(explicit)}).runtime_dir()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_for(tmp_path) as w:
        yield w


def test_log_pruning_keeps_the_log_of_a_broker_still_draining(world: World) -> None:
    old = world.ensure()
    old_proc = process(old.pid)
    turn = world.turn(old.endpoint, "seconds=40 deltas=40")
    turn.wait_first_delta()
    rotate_broker(world.workspace, env=world.env)  # the old broker drains, its turn still running
    logs = Path(old.log_file).parent
    now = time.time()
    os.utime(old.log_file, (now - 7200, now - 7200))  # it has been quiet for long: the oldest log of all
    others = []
    for i in range(12):  # newer than the draining broker's log, older than the next one
        path = logs / f"broker-20200101T0000{i:02d}-{i:08x}.log"
        path.write_text("an old broker's log\n")
        os.utime(path, (now - 3600 + i, now - 3600 + i))
        others.append(path)

    newest = rotate_broker(world.workspace, env=world.env)  # a spawn prunes the logs

    assert old_proc.is_running() and turn.ended_at is None, "the draining broker ended before the check"
    assert Path(old.log_file).exists(), "the log of a broker still running was deleted"
    assert [p.exists() for p in others] == [False] * 3 + [True] * 9, "pruning did not keep the newest logs"
    assert Path(newest.log_file).exists()


def test_a_workspace_holding_a_proxy_package_does_not_shadow_the_broker(world: World) -> None:
    shadow = world.workspace / "proxy"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("import sys\nsys.exit('the workspace proxy package ran')\n")

    broker = world.ensure()

    assert world.client(broker.endpoint).health() == "SERVING"
