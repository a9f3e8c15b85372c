"""What `serve` checks and prepares before anything starts: the configuration, the endpoint,
the token file, the socket's directory and the pid file.

Nothing here imports grpc or asyncio, so `serve` can settle all of it, and spawn the
app-server, while the heavier modules are still loading."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from proxy import contract


class ConfigError(Exception):
    """Bad input to `serve`: reported as one line, exit code 2."""


class StartError(Exception):
    """The app-server could not be started or initialized: exit code 1."""


class TokenError(ValueError):
    """A token file that must not be used."""


@dataclass
class ServeConfig:
    endpoint: str
    app_server: list[str]
    cwd: str = field(default_factory=os.getcwd)
    pid_file: str | None = None
    instance_id: str = field(default_factory=lambda: new_instance_id())
    probe_method: str = "thread/loaded/list"
    probe_interval: float = 1.0
    probe_timeout: float = 3.0
    drain_deadline: float = 3600.0
    idle_timeout: float = 1800.0
    max_age_seconds: float = contract.DEFAULT_MAX_AGE_HOURS * 3600.0  # drains itself this old; 0 = never
    exit_when_wedged: float = contract.DEFAULT_EXIT_WHEN_WEDGED  # exits 1 wedged this long; 0 = never
    start_timeout: float = 60.0
    session_buffer_bytes: int = 8 << 20
    max_message_bytes: int = 64 << 20
    max_line_bytes: int = 256 << 20
    codex_home: str = field(default_factory=lambda: contract.resolve_codex_home(os.environ))

    token_file: str | None = None
    allow_remote: bool = False
    jsonl_endpoint: str | None = None  # unix:PATH of the JSONL front end, if any
    metrics_endpoint: str | None = None  # tcp:HOST:PORT of the Prometheus exposition, if any

    @property
    def is_tcp(self) -> bool:
        return contract.is_tcp(self.endpoint)

    @property
    def socket_path(self) -> str | None:
        """The unix socket path; None for a TCP endpoint."""
        return None if self.is_tcp else parse_endpoint(self.endpoint)

    @property
    def jsonl_socket_path(self) -> str | None:
        """The JSONL front end's socket path; None without one."""
        return None if self.jsonl_endpoint is None else parse_endpoint(self.jsonl_endpoint)

    def metrics_address(self) -> tuple[str, int]:
        """(host, port) of --metrics-endpoint; ConfigError for another form, or for a host that
        is not loopback without --allow-remote."""
        endpoint = self.metrics_endpoint or ""
        try:
            host, port = parse_tcp_endpoint(endpoint)
        except ConfigError:
            raise ConfigError(f"bad --metrics-endpoint {endpoint!r}: expected tcp:HOST:PORT") from None
        if not is_loopback(host) and not self.allow_remote:
            raise ConfigError(f"--metrics-endpoint {endpoint} is not loopback: pass --allow-remote to listen there")
        return host, port

    def validate(self) -> None:
        """ConfigError for an endpoint that must not be served (before anything starts)."""
        jsonl = self.jsonl_socket_path
        if jsonl is not None and jsonl == self.socket_path:
            raise ConfigError(f"--jsonl-endpoint and --endpoint name the same socket: {jsonl}")
        if self.metrics_endpoint is not None:
            self.metrics_address()
        if not self.is_tcp:
            parse_endpoint(self.endpoint)
            return
        host, _ = parse_tcp_endpoint(self.endpoint)
        if not self.token_file:
            raise ConfigError(f"TCP endpoint {self.endpoint} needs --token-file (every RPC but Health is "
                              "authenticated with its bearer token)")
        if not is_loopback(host) and not self.allow_remote:
            raise ConfigError(f"TCP endpoint {self.endpoint} is not loopback: pass --allow-remote to listen there")


def new_instance_id() -> str:
    import uuid  # imported here: `serve` loads this module before it spawns the app-server

    return str(uuid.uuid4())


def parse_tcp_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of ``tcp:HOST:PORT``, by the contract's grammar; ConfigError otherwise."""
    try:
        return contract.parse_tcp_endpoint(endpoint)
    except contract.EndpointError as exc:
        raise ConfigError(str(exc)) from None


def parse_endpoint(endpoint: str) -> str:
    """The absolute socket path of a ``unix:PATH`` endpoint, by the contract's grammar; ConfigError
    otherwise."""
    try:
        return contract.parse_unix_endpoint(endpoint)
    except contract.EndpointError as exc:
        raise ConfigError(str(exc)) from None


def is_loopback(host: str) -> bool:
    import ipaddress  # TCP only

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> str:
    """The token in ``path``: the file must be ours, a regular file, and mode 0600 or stricter."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TokenError(f"unsafe token file {path}: it must be a regular file owned by you with mode 0600 "
                         f"(mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid})")
    if len(token) < 16:
        raise TokenError(f"token in {path} is too short (at least 16 characters)")
    return token


class BrokerFiles:
    """The broker's footprint on disk: the socket's private directory (created when missing),
    the socket, the pid file; ``prepare`` checks and creates, ``remove`` takes away only what
    is ours."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.token: str | None = None
        self.prepared = False
        self._created_dir: str | None = None

    def prepare(self) -> None:
        """ConfigError (having left nothing behind) when the broker must not start here."""
        cfg = self.config
        cfg.validate()
        if cfg.token_file:
            try:
                self.token = read_token_file(cfg.token_file)
            except TokenError as exc:
                raise ConfigError(str(exc)) from None
        sock = cfg.socket_path
        if sock is not None:
            self._prepare_socket_dir(sock)
        self._check_pid_file()
        self.prepared = True

    def _prepare_socket_dir(self, sock: str) -> None:
        directory = os.path.dirname(sock)
        if os.path.lexists(sock):
            raise ConfigError(f"socket path is already in use: {sock} (another broker may be serving it)")
        try:
            os.mkdir(directory, 0o700)
            self._created_dir = directory
        except FileExistsError:
            st = os.stat(directory)
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"not a directory: {directory}") from None
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ConfigError(f"unsafe socket directory {directory}: it must be owned by you and closed to "
                                  f"group and others (mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid})"
                                  ) from None
        except FileNotFoundError:
            raise ConfigError(f"parent directory of the socket does not exist: {os.path.dirname(directory)}"
                              ) from None
        except PermissionError as exc:
            raise ConfigError(f"cannot create socket directory {directory}: {exc.strerror}") from None

    def _check_pid_file(self) -> None:
        path = self.config.pid_file
        if path and os.path.lexists(path):
            pid = read_pid(path)
            if pid is not None and pid != os.getpid() and _pid_exists(pid):
                self.remove()
                raise ConfigError(f"pid file {path} names a running process ({pid})")

    def write_pid(self) -> None:
        path = self.config.pid_file
        if path:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, path)

    def remove_socket(self) -> None:
        """Unlinks the unix socket: from here nobody can connect to it by its path (those
        connected keep their connections). Also part of ``remove``."""
        path = self.config.socket_path
        if path and os.path.lexists(path):
            try:
                os.unlink(path)
            except OSError:
                pass

    def remove(self) -> None:
        self.remove_socket()
        path = self.config.pid_file
        if path and os.path.lexists(path) and read_pid(path) in (os.getpid(), None):  # else not ours
            try:
                os.unlink(path)
            except OSError:
                pass
        if self._created_dir is not None:
            try:
                os.rmdir(self._created_dir)
            except OSError:
                pass


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _pid_exists(pid: int) -> bool:
    import psutil  # only when a pid file is in the way

    return psutil.pid_exists(pid)
