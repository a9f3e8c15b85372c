"""The contract between spawn, serve, gc and identity, in one place: the endpoint grammar, the
names of the files a broker and its lifecycle leave on disk, the serve argv (defined, built and
parsed here), the broker state names, CODEX_HOME resolution and the gRPC channel options.

Import-light on purpose: `serve` loads this module before it spawns the app-server (to start
fast), so it imports neither grpc, protobuf nor asyncio, and nothing heavier than argparse.
Whatever one side writes (spawn's argv, a session directory's name) the other side (gc, identity)
reads back with the functions next to it, so the two can never drift apart."""
from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# -- endpoints -------------------------------------------------------------------------------
MAX_SOCKET_PATH = 107  # bytes; sun_path is 108 with its NUL


class EndpointError(ValueError):
    """An endpoint that does not follow the grammar ``unix:PATH`` | ``tcp:HOST:PORT``."""


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp:")


def parse_unix_endpoint(endpoint: str) -> str:
    """The absolute, normalized socket path of ``unix:PATH`` (or ``unix://ABSPATH``): ``..`` and
    ``.`` are resolved by the text, so a caller comparing it with a directory sees where it is."""
    if not endpoint.startswith("unix:"):
        raise EndpointError(f"unsupported endpoint {endpoint!r}: expected unix:PATH or tcp:HOST:PORT")
    path = endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint[len("unix:"):]
    if not path:
        raise EndpointError(f"bad endpoint {endpoint!r}: empty socket path")
    path = os.path.abspath(path)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise EndpointError(f"socket path too long ({len(path.encode())} bytes, limit {MAX_SOCKET_PATH}): {path}")
    return path


def parse_tcp_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6); port 0 picks a free one."""
    if not is_tcp(endpoint):
        raise EndpointError(f"bad endpoint {endpoint!r}: expected tcp:HOST:PORT")
    host, sep, port = endpoint[len("tcp:"):].rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EndpointError(f"bad endpoint {endpoint!r}: expected tcp:HOST:PORT")
    return host, int(port)


def unix_endpoint(socket_path: str) -> str:
    return f"unix:{socket_path}"


# -- names on disk ---------------------------------------------------------------------------
SOCKET_NAME = "s.sock"  # inside a session directory
JSONL_SOCKET_NAME = "j.sock"  # inside a session directory: the JSONL front end, beside the gRPC socket
PID_FILE_NAME = "broker.pid"  # inside a session directory
LOCK_SUFFIX = ".lock"  # beside each socket: the lock its broker holds for its whole life (a killed one leaves it)
SESSION_FILES = (SOCKET_NAME, JSONL_SOCKET_NAME, PID_FILE_NAME, SOCKET_NAME + LOCK_SUFFIX,
                 JSONL_SOCKET_NAME + LOCK_SUFFIX)  # everything a broker puts in its session directory
SESSION_DIR_BYTES = 4  # random bytes in a session directory's name, as hex
_SESSION_DIR_NAME = re.compile(f"[0-9a-f]{{{2 * SESSION_DIR_BYTES}}}")
RUNTIME_DIR_NAME = "codex-broker"  # under $XDG_RUNTIME_DIR
RUNTIME_KEY_NAME = "runtime-key"  # in the state root: names the private fallback runtime dir
RECORD_NAME = "broker.json"
LOCK_NAME = "lock"
HISTORY_NAME = "history.jsonl"
LOGS_DIR_NAME = "logs"
LOG_GLOB = "broker-*.log"
WORKSPACES_DIR_NAME = "workspaces"


def is_session_dir_name(name: str) -> bool:
    """True for a name spawn gives a session directory (``secrets.token_hex(SESSION_DIR_BYTES)``)."""
    return _SESSION_DIR_NAME.fullmatch(name) is not None


def session_socket(session_dir: str) -> str:
    return os.path.join(session_dir, SOCKET_NAME)


def session_jsonl_socket(session_dir: str) -> str:
    return os.path.join(session_dir, JSONL_SOCKET_NAME)


# -- broker states (BrokerState in protos/broker.proto, without the prefix) -------------------
STARTING, SERVING, DRAINING, STOPPING = "STARTING", "SERVING", "DRAINING", "STOPPING"
WINDING_DOWN = (DRAINING, STOPPING)  # a broker in these states exits by itself

# -- timing shared by spawn and gc -------------------------------------------------------------
SPAWN_TIMEOUT = 30.0  # seconds a spawned broker has to be SERVING; gc leaves younger ones alone

# -- a broker's own lifetime (serve --max-age-hours, --exit-when-wedged) ------------------------
DEFAULT_MAX_AGE_HOURS = 6.0
MAX_AGE_ENV = ("CODEX_BROKER_MAX_AGE_HOURS", "CODEX_COMPANION_BROKER_MAX_AGE_HOURS")
DEFAULT_EXIT_WHEN_WEDGED = 30.0  # seconds


class MaxAgeError(ValueError):
    """A max age in the environment that is not a number of hours >= 0."""


def finite_nonneg(text: str) -> float | None:
    """The number ``text`` holds when it is finite and >= 0, else None (the one rule for the
    numbers the environment gives)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def max_age_hours(flag: float | None, env: Mapping[str, str]) -> float:
    """A broker's max age in hours, one rule for `serve` and the lifecycle: the flag, else
    CODEX_BROKER_MAX_AGE_HOURS, else CODEX_COMPANION_BROKER_MAX_AGE_HOURS, else 6 (an empty
    variable counts as unset); 0 means never. MaxAgeError for a variable that is not a finite
    number >= 0 (never silently the default)."""
    if flag is not None:
        return flag
    for name in MAX_AGE_ENV:
        raw = env.get(name, "").strip()
        if raw:
            hours = finite_nonneg(raw)
            if hours is None:
                raise MaxAgeError(f"{name}={raw!r} is not a valid age: use a number of hours >= 0 (0 = never rotate)")
            return hours
    return DEFAULT_MAX_AGE_HOURS


# -- CODEX_HOME ----------------------------------------------------------------------------------


def resolve_codex_home(env: Mapping[str, str]) -> str:
    """CODEX_HOME as codex would use it, resolved so equal homes compare equal.

    Unset or empty means ``~/.codex``; ``~`` is expanded with the env's HOME when it has one;
    relative paths are taken from the current directory; symlinks are resolved."""
    home = env.get("HOME") or os.path.expanduser("~")
    value = env.get("CODEX_HOME") or os.path.join(home, ".codex")
    if value == "~" or value.startswith("~/"):
        value = home + value[1:]
    return os.path.realpath(os.path.abspath(value))


# -- gRPC channel options (clients of a broker) ----------------------------------------------
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 20),
    # Despite its name, this is gRPC's minimum *connect timeout*: at 20 ms a healthy broker that
    # was slow to send its HTTP/2 SETTINGS (a loaded machine) looked unreachable, i.e. wedged, and
    # got killed with its turns. Connecting is bounded by each RPC's own deadline instead.
    ("grpc.min_reconnect_backoff_ms", 20_000),
    ("grpc.max_reconnect_backoff_ms", 200),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]

# -- the serve argv ----------------------------------------------------------------------------
DEFAULT_APP_SERVER = "codex app-server"
ENTRY_MODULE = "proxy"  # `python -m proxy serve ...`
CONSOLE_SCRIPT = "codex-broker"  # `codex-broker serve ...`
SERVE_COMMAND = "serve"
_PYTHON = re.compile(r"python[0-9.]*")


DEFAULT_LOG_MAX_BYTES = 8 << 20
MIN_LOG_MAX_BYTES = 64 << 10
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT_ENV = "CODEX_BROKER_LOG_FORMAT"  # read by every serve, so brokers the lifecycle spawns follow it
LOG_LEVEL_ENV = "CODEX_BROKER_LOG_LEVEL"


def setting(flag: str | None, env: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    """A serve option with choices (--log-format, --log-level, --cpu-scheduling): the flag, else
    the variable ``name`` (an empty one counts as unset; case and spaces around it do not
    matter), else ``default``. ValueError for a variable not in ``choices``."""
    if flag is not None:
        return flag
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw.lower()


def _nonneg(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _log_bytes(text: str) -> int:
    value = int(text)
    if value < MIN_LOG_MAX_BYTES:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LOG_MAX_BYTES}, got {text}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of `serve`: the one definition that `serve` parses with and gc reads with."""
    p.add_argument("--endpoint", required=True,
                   help="where to listen: unix:PATH (a fresh directory is created 0700), or tcp:HOST:PORT "
                        "(needs --token-file; loopback unless --allow-remote)")
    p.add_argument("--jsonl-endpoint", default=None, metavar="unix:PATH",
                   help="also serve Sessions as JSON lines on this unix socket (created 0600 in an existing "
                        "directory; closed and removed as soon as a drain starts); gRPC stays the admin face")
    p.add_argument("--token-file", default=None,
                   help="a 0600 file with the bearer token every gRPC call but Health (and reflection of Health) "
                        "must carry: required with a tcp: endpoint, optional with a unix: one (a second lock "
                        "beside the socket's 0600 mode); the JSONL front end is guarded by its socket's mode only")
    p.add_argument("--health-endpoint", default=None, metavar="tcp:HOST:PORT|unix:PATH",
                   help="also serve grpc.health.v1 (Check, Watch; services '', codexbroker.v1.AppServer, "
                        "codexbroker.v1.Liveness) and reflection of Health only, with no token, on any address "
                        "(0.0.0.0 for a Kubernetes gRPC probe); a unix socket here needs an existing directory")
    p.add_argument("--allow-remote", action="store_true",
                   help="TCP and --metrics-endpoint only: allow a non-loopback address")
    p.add_argument("--metrics-endpoint", default=None, metavar="tcp:HOST:PORT",
                   help="serve Prometheus metrics over HTTP here (GET /metrics; no token; loopback unless "
                        "--allow-remote; port 0 picks a free one, logged as 'metrics on ...')")
    p.add_argument("--cwd", default=None, help="working directory of the app-server (default: current directory)")
    p.add_argument("--app-server", default=None,
                   help="app-server command, split shell-style (default: $CODEX_BROKER_APP_SERVER or "
                        f"'{DEFAULT_APP_SERVER}')")
    p.add_argument("--pid-file", default=None, help="write the broker's pid here; removed on exit")
    p.add_argument("--instance-id", default=None,
                   help="identity reported by Status (default: a new uuid); give it to every broker reachable "
                        "over TCP, so `stop --force` and `drain --wait` can prove which process answers")
    p.add_argument("--state-root", default=None,
                   help="the lifecycle state root whose records own this broker (passed by spawn; gc judges "
                        "orphans against it)")
    p.add_argument("--probe-method", default="thread/loaded/list", help="read-only request used as health probe")
    p.add_argument("--probe-interval", type=_nonneg, default=1.0, metavar="S",
                   help="probe when nothing answered for this long (default 1)")
    p.add_argument("--probe-timeout", type=_nonneg, default=3.0, metavar="S",
                   help="unanswered this long = wedged, NOT_SERVING (default 3)")
    p.add_argument("--drain-deadline", type=_nonneg, default=3600.0, metavar="S",
                   help="default drain deadline before turns are interrupted (default 3600; a longer one, "
                        "here or in a Drain, is cut to 86400)")
    p.add_argument("--idle-timeout", type=_nonneg, default=1800.0, metavar="S",
                   help="exit after this long with no Sessions and no work; 0 = never (default 1800)")
    p.add_argument("--max-age-hours", type=_nonneg, default=None, metavar="H",
                   help="once this old, drain (NOT_SERVING, no new work; turns in flight finish) and exit 0; "
                        "fractions allowed; 0 = never (default: $CODEX_BROKER_MAX_AGE_HOURS, else "
                        f"$CODEX_COMPANION_BROKER_MAX_AGE_HOURS, else {DEFAULT_MAX_AGE_HOURS:g})")
    p.add_argument("--exit-when-wedged", type=_nonneg, default=DEFAULT_EXIT_WHEN_WEDGED, metavar="S",
                   help="when the app-server has been wedged (NOT_SERVING by --probe-timeout) this long without "
                        "a break, fail pending work, stop listening, kill its process group and exit 1; "
                        f"0 = never (default {DEFAULT_EXIT_WHEN_WEDGED:g})")
    p.add_argument("--session-buffer", type=int, default=8 << 20, metavar="BYTES",
                   help="a Session further behind than this is dropped (default 8 MiB)")
    p.add_argument("--event-loop", default=None, choices=("auto", "uvloop", "asyncio"),
                   help="the event loop: auto (the default: uvloop where installed, else asyncio's "
                        "own), uvloop, or asyncio; default from CODEX_BROKER_EVENT_LOOP")
    p.add_argument("--cpu-scheduling", default=None, choices=("batch", "normal"),
                   help="the event loop's CPU scheduling policy (Linux): batch (the default: SCHED_BATCH while the "
                        "app-server streams fast, from ~3 MiB/s until below 1 MiB/s, so a stream is relayed in "
                        "fewer, larger pieces; the normal policy otherwise; the app-server is never switched) or "
                        "normal (never switched); default from CODEX_BROKER_CPU_SCHEDULING")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help="log to this file (and send stdout/stderr there) instead of stderr, rotated by size")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="text (default), or json: one object per line with time, level, event and the event's "
                        f"fields (app-server stderr lines inside records); default ${LOG_FORMAT_ENV}, else text")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help=f"the least severe records logged (default ${LOG_LEVEL_ENV}, else info)")
    p.add_argument("--log-max-bytes", type=_log_bytes, default=DEFAULT_LOG_MAX_BYTES, metavar="N",
                   help="--log-file never grows past N bytes; then it is rotated to NAME.1.SUFFIX, replacing "
                        f"the previous one (default {DEFAULT_LOG_MAX_BYTES >> 20} MiB, at least {MIN_LOG_MAX_BYTES})")


# -- how long a stop takes ----------------------------------------------------------------------
# Once a broker is told to stop now (a forced drain, or its drain deadline passed), these bound
# what it still does, in order; their sum is the longest it takes to exit after that. `stop
# --force` waits that long (and a little) before SIGKILL, so that a turn slow to acknowledge its
# interrupt is still reported to its client; the systemd unit's TimeoutStopSec covers it too.
INTERRUPT_GRACE = 10.0  # after interrupting turns, how long to wait for their turn/completed
FORCE_GRACE = 5.0  # a forced drain still lets pending responses arrive, this long
SESSION_FLUSH = 1.0  # at stop, how long Sessions get to deliver what is buffered
APP_STOP_WAITS = 2.0 + 2.0 + 1.0  # the app-server's stop: stdin EOF, SIGTERM, its stdout closing
TERM_GRACE = 1.0  # after SIGTERM, how long the broker's other descendants get before SIGKILL
STOP_GRACE = 1.0  # at stop, how long RPCs in flight get to finish before gRPC cancels them
STOP_ESCALATION = INTERRUPT_GRACE + FORCE_GRACE + SESSION_FLUSH + APP_STOP_WAITS + 2 * TERM_GRACE + STOP_GRACE

@dataclass(frozen=True)
class ServeArgv:
    """What a serve argv says, as spawn wrote it and gc reads it back."""

    endpoint: str
    cwd: str | None
    app_server: str | None
    instance_id: str | None
    pid_file: str | None
    state_root: str | None
    token_file: str | None
    jsonl_endpoint: str | None = None
    max_age_hours: float | None = None  # None: not on the command line (the environment's rule)


def build_serve_argv(python: str, *, endpoint: str, cwd: str, app_server: str, instance_id: str,
                     pid_file: str, state_root: str, log_file: str, max_age_hours: float,
                     jsonl_endpoint: str | None = None) -> list[str]:
    """The argv spawn runs: this package's entry point with the interpreter's safe-path mode (``-P``:
    a workspace that holds a ``proxy`` directory cannot shadow the package). The max age is
    explicit, so the broker's lifetime is the spawner's setting, whatever environment it inherits."""
    argv = [python, "-P", "-m", ENTRY_MODULE, SERVE_COMMAND, "--endpoint", endpoint, "--cwd", cwd,
            f"--app-server={app_server}", "--instance-id", instance_id, "--pid-file", pid_file,
            "--state-root", state_root, "--log-file", log_file, f"--max-age-hours={max_age_hours!r}"]
    if jsonl_endpoint is not None:
        argv += ["--jsonl-endpoint", jsonl_endpoint]
    return argv


class _StrictParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _strict_parser() -> _StrictParser:
    parser = _StrictParser(prog=SERVE_COMMAND, add_help=False, allow_abbrev=False)
    add_serve_arguments(parser)
    return parser


def serve_options(argv: Sequence[str]) -> list[str] | None:
    """The options after ``serve`` when ``argv`` runs this package's entry point
    (``python [-P] -m proxy serve``, ``[python] .../codex-broker serve``), else None."""
    args = list(argv)
    if args and _PYTHON.fullmatch(os.path.basename(args[0])):
        rest = args[1:]
        if rest[:1] == ["-P"]:
            rest = rest[1:]
        if rest[:3] == ["-m", ENTRY_MODULE, SERVE_COMMAND]:
            return rest[3:]
        args = rest  # a console script run by its interpreter
    if len(args) >= 2 and os.path.basename(args[0]) == CONSOLE_SCRIPT and args[1] == SERVE_COMMAND:
        return args[2:]
    return None


def parse_serve_argv(argv: Sequence[str]) -> ServeArgv | None:
    """The serve argv in ``argv`` (a process's command line), or None unless it is exactly one:
    this package's entry point, then only serve's own options, each at most once."""
    options = serve_options(argv)
    if options is None:
        return None
    flags = [arg.split("=", 1)[0] for arg in options if arg.startswith("--")]
    if len(flags) != len(set(flags)):
        return None
    try:
        ns = _strict_parser().parse_args(options)
    except ValueError:
        return None
    return ServeArgv(endpoint=ns.endpoint, cwd=ns.cwd, app_server=ns.app_server, instance_id=ns.instance_id,
                     pid_file=ns.pid_file, state_root=ns.state_root, token_file=ns.token_file,
                     jsonl_endpoint=ns.jsonl_endpoint, max_age_hours=ns.max_age_hours)
