"""One error type carrying a canonical status code, and its gRPC / HTTP / proto spellings.

TF Serving's API contract is the canonical code (INVALID_ARGUMENT, NOT_FOUND, ...); the REST
front end derives its HTTP status from it with the same table tensorflow_model_server uses,
so a caller sees one consistent answer whichever protocol it speaks.
"""

from __future__ import annotations

import grpc
import tensorflow as tf

# Canonical code name -> HTTP status, as tensorflow_model_server's REST front end maps them.
_HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request or load failure with a canonical code (a `grpc.StatusCode` member name)."""

    def __init__(self, code: str, message: str):
        if code not in _HTTP_STATUS:
            raise ValueError(f"unknown canonical code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return getattr(grpc.StatusCode, self.code)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.code]

    @property
    def proto_code(self) -> int:
        """The `tensorflow.error.Code` number used in StatusProto."""
        return self.grpc_code.value[0]

    def __str__(self):
        return f"{self.code}: {self.message}"


def invalid_argument(msg): return ServingError("INVALID_ARGUMENT", msg)
def not_found(msg): return ServingError("NOT_FOUND", msg)
def failed_precondition(msg): return ServingError("FAILED_PRECONDITION", msg)
def unavailable(msg): return ServingError("UNAVAILABLE", msg)
def unimplemented(msg): return ServingError("UNIMPLEMENTED", msg)
def deadline_exceeded(msg): return ServingError("DEADLINE_EXCEEDED", msg)
def internal(msg): return ServingError("INTERNAL", msg)
def unknown(msg): return ServingError("UNKNOWN", msg)


def from_exception(exc: BaseException) -> ServingError:
    """Maps any exception from a model call or load to a ServingError.

    TensorFlow's OpErrors already carry a canonical code (e.g. a corrupt JPEG inside the
    graph is INVALID_ARGUMENT); anything else is an INTERNAL fault of ours.
    """
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, tf.errors.OpError):
        code = grpc.StatusCode.UNKNOWN
        for status in grpc.StatusCode:
            if status.value[0] == exc.error_code:
                code = status
                break
        return ServingError(code.name, _op_error_text(exc.message or str(exc)))
    if isinstance(exc, (ValueError, TypeError)):
        return invalid_argument(str(exc))
    return internal(f"{type(exc).__name__}: {exc}")


def _op_error_text(message: str) -> str:
    """The human part of a TF op error: drops 'Graph execution error', node traces and op ids."""
    skip = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[", "\t [[",
            'File "')  # the Python frames where a (TF1 or traced) graph's node was defined
    lines = [ln.strip() for ln in message.splitlines()]
    kept = [ln.split(" [[")[0].split(" [Op:")[0] for ln in lines if ln and not ln.startswith(skip)]
    return " ".join(kept) or message.strip()
