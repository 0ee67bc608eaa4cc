"""Domain errors: each carries a message safe to show to a client and a status name.

``service.api.status`` maps them to gRPC status codes in one table; nothing else in the
service deals in gRPC codes.
"""

from __future__ import annotations


class ServeError(Exception):
    """An error the client should see, with a message that helps."""

    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    status = "INVALID_ARGUMENT"


class NotFound(ServeError):
    status = "NOT_FOUND"


class ResourceExhausted(ServeError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServeError):
    status = "UNAVAILABLE"


class DeadlineExceeded(ServeError):
    status = "DEADLINE_EXCEEDED"


class FailedPrecondition(ServeError):
    status = "FAILED_PRECONDITION"
