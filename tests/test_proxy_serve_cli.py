"""`serve` input errors and the socket's permissions: bad input is one clear line on stderr,
exit code 2, and nothing left behind; the app-server command comes from --app-server or
CODEX_BROKER_APP_SERVER, split shell-style."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import stat
import subprocess
import sys

import psutil
import pytest
from harness import (
    ROOT,
    SERVING,
    error_lines,
    fake_command,
    methods_in,
    new_marker,
    processes_with,
    read_request_log,
    run_serve,
    wait_for,
    wait_gone,
)


def assert_refused(result, *, words: tuple[str, ...]) -> str:
    """Exit code 2, one error line naming the cause, no traceback; returns the line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_serve_refuses_missing_app_server_binary_and_leaves_nothing(base):
    sock_dir = os.path.join(base, "d")
    result = run_serve("--endpoint", f"unix:{sock_dir}/s.sock", "--app-server",
                       f"/nonexistent/codex-{new_marker()} app-server")
    assert_refused(result, words=("not found", "/nonexistent/codex-"))
    assert not os.path.exists(sock_dir)
    assert os.listdir(base) == []


@pytest.mark.parametrize("endpoint", ["tcp:127.0.0.1:0", "", "unix:", "unix:/tmp/" + "x" * 100 + "/s.sock"],
                         ids=["tcp", "empty", "empty-path", "path-over-107-bytes"])
def test_serve_refuses_bad_endpoint_with_one_line_and_exit_2(endpoint, base):
    marker = new_marker()
    result = run_serve("--endpoint", endpoint, "--app-server", fake_command(marker=marker))
    assert_refused(result, words=("endpoint",) if "x" * 100 not in endpoint else ("too long",))
    assert not processes_with(marker)
    if "x" * 100 in endpoint:
        assert not os.path.exists("/tmp/" + "x" * 100)


def test_serve_refuses_occupied_socket_path_and_keeps_it(base):
    sock_dir = os.path.join(base, "d")
    os.mkdir(sock_dir, 0o700)
    path = os.path.join(sock_dir, "s.sock")
    marker = new_marker()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(path)
        other.listen()
        result = run_serve("--endpoint", f"unix:{path}", "--app-server", fake_command(marker=marker))
        assert_refused(result, words=("already in use", path))
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "the other owner's socket was removed"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # still the other owner's, still listening
    assert not processes_with(marker)


def test_serve_refuses_socket_dir_open_to_group_and_others(base):
    sock_dir = os.path.join(base, "d")
    os.mkdir(sock_dir)
    os.chmod(sock_dir, 0o755)
    marker = new_marker()
    result = run_serve("--endpoint", f"unix:{sock_dir}/s.sock", "--app-server", fake_command(marker=marker))
    line = assert_refused(result, words=("unsafe socket directory", sock_dir))
    assert "755" in line
    assert os.listdir(sock_dir) == []
    assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o755
    assert not processes_with(marker)


def test_socket_is_0600_inside_a_0700_dir(broker):
    b = broker()
    st = os.lstat(b.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(b.dir).st_mode) == 0o700
    assert os.stat(b.dir).st_uid == os.getuid()


def test_app_server_command_from_env_var_is_split_shell_style(broker):
    b = broker(fake_args=["--note=two words", "--lenient-initialize"], via_env=True)
    assert "'--note=two words'" in b.command
    assert b.health() == SERVING
    assert list(b.status().app_server_command) == shlex.split(b.command)
    assert "--note=two words" in b.app_server.cmdline()


def test_app_server_flag_is_split_shell_style(broker):
    b = broker(fake_args=["--note=a 'quoted' arg"])
    assert list(b.status().app_server_command) == shlex.split(b.command)
    assert "--note=a 'quoted' arg" in b.app_server.cmdline()


def test_app_server_refusing_initialize_is_exit_1_with_the_error(base):
    sock_dir = os.path.join(base, "d")
    marker = new_marker()
    result = run_serve("--endpoint", f"unix:{sock_dir}/s.sock", "--app-server", fake_command(marker=marker),
                       env={"FAKE_INIT_FAIL": "1"})
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result.stderr)
    assert "refused initialize" in line and "FAKE_INIT_FAIL" in line
    assert not os.path.exists(sock_dir)
    assert not processes_with(marker)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])  # uvloop refused the write to the closed pipe
def test_app_server_exiting_before_initialize_is_exit_1_with_its_status_and_stderr(base, loop):
    sock_dir = os.path.join(base, "d")
    command = shlex.join([sys.executable, "-c", "import sys; sys.stderr.write('no config here\\n'); sys.exit(5)"])
    result = run_serve("--endpoint", f"unix:{sock_dir}/s.sock", "--app-server", command, "--event-loop", loop)
    assert result.returncode == 1, result.stderr
    (line,) = [ln for ln in error_lines(result.stderr) if not ln.startswith("app-server: ")]
    assert "exited with status 5" in line and "no config here" in line
    assert not os.path.exists(sock_dir)


def test_sigterm_while_starting_exits_0_and_leaves_nothing(broker, tmp_path):
    log = tmp_path / "requests.jsonl"
    b = broker(env={"FAKE_STARTUP_SECONDS": "30", "FAKE_LOG_REQUESTS": str(log)}, ready=False)
    wait_for(lambda: "initialize" in methods_in(read_request_log(log)), what="the app-server to get initialize")
    app = b.app_server
    os.kill(b.pid, signal.SIGTERM)
    assert b.wait_exit(15) == 0
    assert not os.path.exists(b.dir)
    assert not wait_gone([app], 5)


def test_pid_file_is_written_when_ready_and_removed_on_exit(broker, tmp_path):
    pid_file = tmp_path / "broker.pid"
    b = broker("--pid-file", str(pid_file))
    assert pid_file.read_text().strip() == str(b.pid)
    b.drain()
    assert b.wait_exit(15) == 0
    assert not pid_file.exists()


def test_sigterm_right_after_the_app_server_is_spawned_exits_0_and_leaves_nothing(base):
    """`serve` spawns the app-server before it loads grpc; a SIGTERM then (or a moment later,
    once the broker runs: the outcome must be the same) stops both and leaves nothing."""
    sock_dir = os.path.join(base, "d")
    marker = new_marker()
    with subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--endpoint", f"unix:{sock_dir}/s.sock",
                           "--app-server", fake_command(marker=marker)], cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "app-server started pid=" in line:
                    app = psutil.Process(int(line.rsplit("pid=", 1)[1].split()[0]))
                    break
            else:
                pytest.fail(f"no 'app-server started' line; exit {proc.wait()}")
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()
            assert proc.wait(20) == 0, rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in rest, rest
    assert not os.path.exists(sock_dir)
    assert not wait_gone([app], 5)
    assert not processes_with(marker)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_serve_refuses_a_drain_deadline_that_is_not_a_finite_number(value, base):
    result = run_serve("--endpoint", f"unix:{base}/d/s.sock", "--app-server", "true", f"--drain-deadline={value}")
    assert result.returncode == 2, result.stderr
    assert "--drain-deadline" in result.stderr and "finite number >= 0" in result.stderr, result.stderr
    assert not os.path.exists(f"{base}/d")
