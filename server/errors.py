"""The errors a request can end with, and the one table that maps each to its HTTP status and gRPC code.

The engine core raises them, the engine socket carries them by name (never as pickled objects), and both
frontends answer them from STATUS, so a refusal reads the same over HTTP and gRPC.
"""
from dataclasses import dataclass

from server.lora import LoRAError
from server.sampling import InvalidRequestError


class ModelNotFoundError(LookupError):
    """A request named a model or adapter this engine does not serve (404 / NOT_FOUND)."""


class ServerBusyError(RuntimeError):
    """--max-queued-requests are already waiting: refused at once (429 / RESOURCE_EXHAUSTED), retry later."""


class ShuttingDownError(RuntimeError):
    """The server is draining for shutdown and takes no new requests (503 / UNAVAILABLE)."""


class RequestFailedError(RuntimeError):
    """The engine ended this request before it finished (500 / INTERNAL); the message names it and says why."""


class ShutdownAbortError(RequestFailedError):
    """--shutdown-timeout passed while the request was in flight: ended (503 / UNAVAILABLE), the process exits."""


class RequestTimeoutError(RequestFailedError):
    """The request outlasted --request-timeout (408 / DEADLINE_EXCEEDED); its blocks are freed."""


class EngineDeadError(RequestFailedError):
    """The engine core stopped (its process died or its step loop failed); the server exits (503 / UNAVAILABLE)."""


@dataclass(frozen=True)
class ErrorStatus:
    http: int
    type: str             # OpenAI's error type
    code: str | None      # OpenAI's error code
    grpc: str             # the grpc.StatusCode's name


STATUS: dict[type, ErrorStatus] = {   # looked up along the exception's class hierarchy, most specific first
    InvalidRequestError: ErrorStatus(400, "invalid_request_error", None, "INVALID_ARGUMENT"),
    LoRAError: ErrorStatus(400, "invalid_request_error", None, "INVALID_ARGUMENT"),
    ModelNotFoundError: ErrorStatus(404, "NotFoundError", "model_not_found", "NOT_FOUND"),
    ServerBusyError: ErrorStatus(429, "rate_limit_error", "queue_full", "RESOURCE_EXHAUSTED"),
    ShuttingDownError: ErrorStatus(503, "service_unavailable", "shutting_down", "UNAVAILABLE"),
    ShutdownAbortError: ErrorStatus(503, "service_unavailable", "shutting_down", "UNAVAILABLE"),
    EngineDeadError: ErrorStatus(503, "service_unavailable", "engine_dead", "UNAVAILABLE"),
    RequestTimeoutError: ErrorStatus(408, "timeout_error", "request_timeout", "DEADLINE_EXCEEDED"),
    RequestFailedError: ErrorStatus(500, "internal_error", "request_failed", "INTERNAL"),
}
_BY_NAME = {cls.__name__: cls for cls in STATUS}


def status_of(exc: BaseException) -> ErrorStatus | None:
    """The status for an error the engine raises about one request; None for anything else (a server bug)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


def error_to_wire(exc: BaseException) -> tuple[str, str, str | None]:
    """(class name, message, param) of one of the errors in STATUS, for the engine socket."""
    name = next((c.__name__ for c in type(exc).__mro__ if c in STATUS), RequestFailedError.__name__)
    return name, str(exc), getattr(exc, "param", None)


def error_from_wire(name: str, message: str, param: str | None) -> Exception:
    """The exception error_to_wire described; an unknown name becomes a RequestFailedError."""
    cls = _BY_NAME.get(name, RequestFailedError)
    return cls(message, param) if cls is InvalidRequestError else cls(message)
