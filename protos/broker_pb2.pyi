from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BrokerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BROKER_STATE_UNSPECIFIED: _ClassVar[BrokerState]
    BROKER_STATE_STARTING: _ClassVar[BrokerState]
    BROKER_STATE_SERVING: _ClassVar[BrokerState]
    BROKER_STATE_DRAINING: _ClassVar[BrokerState]
    BROKER_STATE_STOPPING: _ClassVar[BrokerState]
BROKER_STATE_UNSPECIFIED: BrokerState
BROKER_STATE_STARTING: BrokerState
BROKER_STATE_SERVING: BrokerState
BROKER_STATE_DRAINING: BrokerState
BROKER_STATE_STOPPING: BrokerState

class ClientFrame(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, messages: _Optional[_Iterable[str]] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("method", "params_json")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    method: str
    params_json: str
    def __init__(self, method: _Optional[str] = ..., params_json: _Optional[str] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("result_json", "error")
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    error: JsonRpcError
    def __init__(self, result_json: _Optional[str] = ..., error: _Optional[_Union[JsonRpcError, _Mapping]] = ...) -> None: ...

class JsonRpcError(_message.Message):
    __slots__ = ("code", "message", "data_json")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    data_json: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InFlightTurn(_message.Message):
    __slots__ = ("thread_id", "turn_id", "started_at", "session_id")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    turn_id: str
    started_at: float
    session_id: str
    def __init__(self, thread_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., started_at: _Optional[float] = ..., session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "opened_at", "client_name", "pending_requests", "subscribed_threads", "half_closed", "queued_bytes", "opt_out_notification_methods", "transport")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_THREADS_FIELD_NUMBER: _ClassVar[int]
    HALF_CLOSED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPT_OUT_NOTIFICATION_METHODS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    opened_at: float
    client_name: str
    pending_requests: int
    subscribed_threads: int
    half_closed: bool
    queued_bytes: int
    opt_out_notification_methods: _containers.RepeatedScalarFieldContainer[str]
    transport: str
    def __init__(self, session_id: _Optional[str] = ..., opened_at: _Optional[float] = ..., client_name: _Optional[str] = ..., pending_requests: _Optional[int] = ..., subscribed_threads: _Optional[int] = ..., half_closed: _Optional[bool] = ..., queued_bytes: _Optional[int] = ..., opt_out_notification_methods: _Optional[_Iterable[str]] = ..., transport: _Optional[str] = ...) -> None: ...

class BrokerStatus(_message.Message):
    __slots__ = ("instance_id", "pid", "started_at", "state", "app_server_pid", "app_server_alive", "last_probe_at", "last_probe_latency_ms", "open_sessions", "in_flight_turns", "pending_requests", "version", "cwd", "endpoint", "sessions", "app_server_command", "codex_home", "health", "last_response_at", "drain_deadline", "drain_reason", "idle_timeout_seconds", "app_server_create_time_ms", "max_age_hours", "exit_when_wedged_seconds")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APP_SERVER_PID_FIELD_NUMBER: _ClassVar[int]
    APP_SERVER_ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_TURNS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    APP_SERVER_COMMAND_FIELD_NUMBER: _ClassVar[int]
    CODEX_HOME_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LAST_RESPONSE_AT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_REASON_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APP_SERVER_CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_HOURS_FIELD_NUMBER: _ClassVar[int]
    EXIT_WHEN_WEDGED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    pid: int
    started_at: float
    state: BrokerState
    app_server_pid: int
    app_server_alive: bool
    last_probe_at: float
    last_probe_latency_ms: float
    open_sessions: int
    in_flight_turns: _containers.RepeatedCompositeFieldContainer[InFlightTurn]
    pending_requests: int
    version: str
    cwd: str
    endpoint: str
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    app_server_command: _containers.RepeatedScalarFieldContainer[str]
    codex_home: str
    health: str
    last_response_at: float
    drain_deadline: float
    drain_reason: str
    idle_timeout_seconds: float
    app_server_create_time_ms: int
    max_age_hours: float
    exit_when_wedged_seconds: float
    def __init__(self, instance_id: _Optional[str] = ..., pid: _Optional[int] = ..., started_at: _Optional[float] = ..., state: _Optional[_Union[BrokerState, str]] = ..., app_server_pid: _Optional[int] = ..., app_server_alive: _Optional[bool] = ..., last_probe_at: _Optional[float] = ..., last_probe_latency_ms: _Optional[float] = ..., open_sessions: _Optional[int] = ..., in_flight_turns: _Optional[_Iterable[_Union[InFlightTurn, _Mapping]]] = ..., pending_requests: _Optional[int] = ..., version: _Optional[str] = ..., cwd: _Optional[str] = ..., endpoint: _Optional[str] = ..., sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., app_server_command: _Optional[_Iterable[str]] = ..., codex_home: _Optional[str] = ..., health: _Optional[str] = ..., last_response_at: _Optional[float] = ..., drain_deadline: _Optional[float] = ..., drain_reason: _Optional[str] = ..., idle_timeout_seconds: _Optional[float] = ..., app_server_create_time_ms: _Optional[int] = ..., max_age_hours: _Optional[float] = ..., exit_when_wedged_seconds: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("deadline_seconds", "reason", "force")
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    deadline_seconds: float
    reason: str
    force: bool
    def __init__(self, deadline_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("state", "in_flight_turns", "pending_requests")
    STATE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_TURNS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    state: BrokerState
    in_flight_turns: int
    pending_requests: int
    def __init__(self, state: _Optional[_Union[BrokerState, str]] = ..., in_flight_turns: _Optional[int] = ..., pending_requests: _Optional[int] = ...) -> None: ...
