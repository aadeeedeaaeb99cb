from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterModelRequest(_message.Message):
    __slots__ = ("name", "storage_uri", "lazy", "size_hint_bytes", "pinned", "min_copies", "load_timeout_s", "runtime", "timeout_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORAGE_URI_FIELD_NUMBER: _ClassVar[int]
    LAZY_FIELD_NUMBER: _ClassVar[int]
    SIZE_HINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MIN_COPIES_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    storage_uri: str
    lazy: bool
    size_hint_bytes: int
    pinned: bool
    min_copies: int
    load_timeout_s: float
    runtime: str
    timeout_ms: int
    def __init__(self, name: _Optional[str] = ..., storage_uri: _Optional[str] = ..., lazy: _Optional[bool] = ..., size_hint_bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., min_copies: _Optional[int] = ..., load_timeout_s: _Optional[float] = ..., runtime: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class UnregisterModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelCopy(_message.Message):
    __slots__ = ("instance_id", "state", "since")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    state: str
    since: float
    def __init__(self, instance_id: _Optional[str] = ..., state: _Optional[str] = ..., since: _Optional[float] = ...) -> None: ...

class LoadFailure(_message.Message):
    __slots__ = ("instance_id", "at", "message")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    at: float
    message: str
    def __init__(self, instance_id: _Optional[str] = ..., at: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "storage_uri", "state", "reason", "copies", "failures", "size_bytes", "last_used", "pinned", "min_copies", "load_timeout_s", "size_hint_bytes", "registered_at", "aliases", "runtime", "timeout_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORAGE_URI_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MIN_COPIES_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SIZE_HINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    storage_uri: str
    state: str
    reason: str
    copies: _containers.RepeatedCompositeFieldContainer[ModelCopy]
    failures: _containers.RepeatedCompositeFieldContainer[LoadFailure]
    size_bytes: int
    last_used: float
    pinned: bool
    min_copies: int
    load_timeout_s: float
    size_hint_bytes: int
    registered_at: float
    aliases: _containers.RepeatedScalarFieldContainer[str]
    runtime: str
    timeout_ms: int
    def __init__(self, name: _Optional[str] = ..., storage_uri: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[ModelCopy, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[LoadFailure, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., last_used: _Optional[float] = ..., pinned: _Optional[bool] = ..., min_copies: _Optional[int] = ..., load_timeout_s: _Optional[float] = ..., size_hint_bytes: _Optional[int] = ..., registered_at: _Optional[float] = ..., aliases: _Optional[_Iterable[str]] = ..., runtime: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("alias", "model", "auto_delete")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTO_DELETE_FIELD_NUMBER: _ClassVar[int]
    alias: str
    model: str
    auto_delete: bool
    def __init__(self, alias: _Optional[str] = ..., model: _Optional[str] = ..., auto_delete: _Optional[bool] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("alias", "model", "auto_delete", "switching_to", "last_error", "updated_at", "previous_model")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTO_DELETE_FIELD_NUMBER: _ClassVar[int]
    SWITCHING_TO_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MODEL_FIELD_NUMBER: _ClassVar[int]
    alias: str
    model: str
    auto_delete: bool
    switching_to: str
    last_error: str
    updated_at: float
    previous_model: str
    def __init__(self, alias: _Optional[str] = ..., model: _Optional[str] = ..., auto_delete: _Optional[bool] = ..., switching_to: _Optional[str] = ..., last_error: _Optional[str] = ..., updated_at: _Optional[float] = ..., previous_model: _Optional[str] = ...) -> None: ...

class GetAliasRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    def __init__(self, alias: _Optional[str] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    def __init__(self, alias: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAliasesRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAliasesResponse(_message.Message):
    __slots__ = ("aliases", "next_page_token")
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedCompositeFieldContainer[Alias]
    next_page_token: str
    def __init__(self, aliases: _Optional[_Iterable[_Union[Alias, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Node(_message.Message):
    __slots__ = ("instance_id", "endpoint", "capacity_bytes", "used_bytes", "model_count", "cache_age_s", "request_rate", "inflight", "loads_in_progress", "shutting_down", "version", "runtime")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    LOADS_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SHUTTING_DOWN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    endpoint: str
    capacity_bytes: int
    used_bytes: int
    model_count: int
    cache_age_s: float
    request_rate: float
    inflight: int
    loads_in_progress: int
    shutting_down: bool
    version: str
    runtime: str
    def __init__(self, instance_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., model_count: _Optional[int] = ..., cache_age_s: _Optional[float] = ..., request_rate: _Optional[float] = ..., inflight: _Optional[int] = ..., loads_in_progress: _Optional[int] = ..., shutting_down: _Optional[bool] = ..., version: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...
