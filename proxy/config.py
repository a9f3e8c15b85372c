"""What `serve` checks and prepares before anything starts: the configuration, the endpoint,
the token file, the socket's directory, the socket paths and the pid file.

A fixed socket path survives a crash. Each unix socket the broker listens on (gRPC and JSONL)
is claimed under an exclusive lock file beside it (``PATH.lock``, flock), held for the broker's
whole life and released only after the socket is gone: gRPC unlinks its socket's path both when
it binds and when it stops, so without the lock an old broker still stopping would unlink its
successor's socket. Holding the lock, the claim decides by one rule (``socket_liveness``, also
the JSONL front end's): a path with nothing there is free; a socket whose connect attempt is
refused (ECONNREFUSED, or the file gone meanwhile) is a crashed broker's and is replaced; one
that accepts, or whose backlog is full (EAGAIN), is live and `serve` refuses (exit 2).

Nothing here imports grpc or asyncio, so `serve` can settle all of it, and spawn the
app-server, while the heavier modules are still loading."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
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
    health_endpoint: str | None = None  # tcp:HOST:PORT or unix:PATH serving Health only, no token
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

    @property
    def health_socket_path(self) -> str | None:
        """The health endpoint's unix socket path; None without one or for a TCP one."""
        if self.health_endpoint is None or contract.is_tcp(self.health_endpoint):
            return None
        return parse_endpoint(self.health_endpoint)

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
        self._validate_health_endpoint()
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

    def _validate_health_endpoint(self) -> None:
        """Any address will do (all it tells is SERVING or NOT_SERVING), but not a socket path
        or TCP address another of the broker's endpoints uses."""
        if self.health_endpoint is None:
            return
        if contract.is_tcp(self.health_endpoint):
            health = parse_tcp_endpoint(self.health_endpoint)
            if self.is_tcp and health == parse_tcp_endpoint(self.endpoint) and health[1] != 0:
                raise ConfigError(f"--health-endpoint and --endpoint name the same address: {self.health_endpoint}")
            return
        path = self.health_socket_path
        if path in (self.socket_path, self.jsonl_socket_path):
            raise ConfigError(f"--health-endpoint names a socket another endpoint uses: {path}")


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


LIVE, STALE, MISSING = "live", "stale", "missing"
DEAD_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT})  # nobody accepts there; EAGAIN is a full backlog


def liveness_from_errno(err: int | None) -> str:
    """The verdict on a socket from its connect attempt's errno (None: it connected): STALE only
    when refused or gone, LIVE when it connected or its backlog is full; OSError otherwise."""
    if err is None or err in (errno.EAGAIN, errno.EWOULDBLOCK):
        return LIVE
    if err in DEAD_ERRNOS:
        return STALE
    raise OSError(err, os.strerror(err))


def socket_liveness(path: str, what: str = "socket") -> str:
    """MISSING (nothing at ``path``), STALE (a socket nobody accepts on) or LIVE (it accepts, or
    its backlog is full). ConfigError when the path holds something that is not a socket, or
    the connect attempt fails otherwise. Never blocks: the attempt is non-blocking."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return MISSING
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} path is taken by something that is not a socket: {path}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        try:
            probe.connect(path)
            err = None
        except OSError as exc:
            err = exc.errno
        try:
            return liveness_from_errno(err)
        except OSError as exc:
            raise ConfigError(f"{what} path {path} cannot be checked: {exc.strerror}") from None
    finally:
        probe.close()


class SocketClaim:
    """An exclusive claim on one unix socket path: the lock file ``PATH.lock`` held (flock) from
    ``acquire`` to ``release``, and a crashed broker's socket replaced. The lock file is unlinked
    while still locked, so a claimant that opened it before checks, after locking, that the file
    it holds is still the one at the path (else it retries on the new one)."""

    def __init__(self, path: str, what: str = "socket"):
        self.path = path
        self.what = what
        self.lock_path = path + contract.LOCK_SUFFIX
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """ConfigError (holding nothing) when another broker holds the path or its socket is live."""
        self._lock()
        try:
            verdict = socket_liveness(self.path, self.what)
            if verdict == LIVE:
                raise ConfigError(f"{self.what} path is already in use: {self.path} (another broker may be "
                                  "serving it)")
            if verdict == STALE:
                os.unlink(self.path)  # a crashed broker's: nobody accepts there, and we hold the lock
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        for _ in range(10):
            try:  # not inherited by the app-server (Python's descriptors are close-on-exec)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise ConfigError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"{self.what} path is already in use: {self.path} (another broker holds "
                                  f"{self.lock_path})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)  # its holder unlinked it before releasing: lock the file now at the path
        raise ConfigError(f"cannot lock {self.lock_path}: it keeps being replaced")

    def remove_socket(self) -> None:
        """Unlinks the socket, only while the path is ours."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """The lock file unlinked, then unlocked. Idempotent."""
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


class BrokerFiles:
    """The broker's footprint on disk: the socket's private directory (created when missing),
    the claimed socket paths (gRPC and JSONL: see SocketClaim), the pid file; ``prepare`` checks
    and creates, ``remove`` takes away only what is ours."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.token: str | None = None
        self.prepared = False
        self._created_dir: str | None = None
        self.health_socket: str | None = None  # the health endpoint's socket, once the broker bound it
        self._claims: list[SocketClaim] = []
        self._socket_claim: SocketClaim | None = None

    def prepare(self) -> None:
        """ConfigError (having left nothing behind) when the broker must not start here."""
        cfg = self.config
        cfg.validate()
        if cfg.token_file:
            try:
                self.token = read_token_file(cfg.token_file)
            except TokenError as exc:
                raise ConfigError(str(exc)) from None
        try:
            sock = cfg.socket_path
            if sock is not None:
                self._prepare_socket_dir(sock)
                self._socket_claim = self._claim(sock, "socket")
            jsonl = cfg.jsonl_socket_path
            if jsonl is not None:
                if not os.path.isdir(os.path.dirname(jsonl)):
                    raise ConfigError(f"directory of the JSONL socket does not exist: {os.path.dirname(jsonl)}")
                self._claim(jsonl, "JSONL socket")
            health = cfg.health_socket_path
            if health is not None:
                self._claim(health, "health socket")
            self._check_pid_file()
        except BaseException:
            self.remove()
            raise
        self.prepared = True

    def _claim(self, path: str, what: str) -> SocketClaim:
        claim = SocketClaim(path, what)
        claim.acquire()
        self._claims.append(claim)
        return claim

    def _prepare_socket_dir(self, sock: str) -> None:
        directory = os.path.dirname(sock)
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
                raise ConfigError(f"pid file {path} names a running process ({pid})")

    def write_pid(self) -> None:
        path = self.config.pid_file
        if path:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, path)

    def remove_socket(self) -> None:
        """Unlinks the gRPC unix socket (only while its path is ours): from here nobody can
        connect to it by its path (those connected keep their connections). Also part of
        ``remove``."""
        if self._socket_claim is not None:
            self._socket_claim.remove_socket()

    def remove(self) -> None:
        """Everything ours gone; the socket paths' locks released last, after their sockets."""
        self.remove_socket()
        if self.health_socket is not None and os.path.lexists(self.health_socket):
            try:
                os.unlink(self.health_socket)
            except OSError:
                pass
        path = self.config.pid_file
        if path and os.path.lexists(path) and read_pid(path) in (os.getpid(), None):  # else not ours
            try:
                os.unlink(path)
            except OSError:
                pass
        for claim in self._claims:
            claim.release()
        self._claims.clear()
        self._socket_claim = None
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
