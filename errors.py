"""The errors the service answers with, and how each is answered: one class per kind, each naming its HTTP
status and the `code` of the socket's `error` frame. Every layer raises these (a module subclasses one for
a message of its own); main.py answers them all with one handler, over REST and sockets alike."""

from starlette.status import (
    HTTP_400_BAD_REQUEST,
    HTTP_403_FORBIDDEN,
    HTTP_404_NOT_FOUND,
    HTTP_408_REQUEST_TIMEOUT,
    HTTP_409_CONFLICT,
    HTTP_413_CONTENT_TOO_LARGE,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_502_BAD_GATEWAY,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_504_GATEWAY_TIMEOUT,
)


class ServiceError(Exception):
    """`message` is for a person and never holds a secret or upstream text; `retry_after` (seconds) is
    given where waiting helps. A subclass may set either as a default."""

    status = HTTP_500_INTERNAL_SERVER_ERROR
    frame_code = "internal_error"
    message = "internal error"
    retry_after: float | None = None

    def __init__(self, message: str | None = None, retry_after: float | None = None):
        if message is not None:
            self.message = message
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(self.message)


class BadRequest(ServiceError):
    status, frame_code = HTTP_400_BAD_REQUEST, "invalid_frame"


class Forbidden(ServiceError):
    status, frame_code = HTTP_403_FORBIDDEN, "forbidden"


class NotFound(ServiceError):
    status, frame_code = HTTP_404_NOT_FOUND, "not_found"


class RequestTimeout(ServiceError):
    status, frame_code = HTTP_408_REQUEST_TIMEOUT, "timeout"


class Conflict(ServiceError):
    status, frame_code = HTTP_409_CONFLICT, "conflict"


class TooLarge(ServiceError):
    status, frame_code = HTTP_413_CONTENT_TOO_LARGE, "invalid_frame"


class LimitReached(ServiceError):
    """A per-user or per-thread bound; `retry_after` is None where waiting does not help."""

    status, frame_code = HTTP_429_TOO_MANY_REQUESTS, "limit_reached"


class Unavailable(ServiceError):
    status, frame_code = HTTP_503_SERVICE_UNAVAILABLE, "unavailable"
    retry_after = 5


class UpstreamError(ServiceError):
    """The upstream refused or failed. `code` names how, for a run's `error` (`run.failed`, the stored run)."""

    status, frame_code = HTTP_502_BAD_GATEWAY, "upstream_error"

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message, retry_after)
        self.code = code

    def as_json(self) -> dict:
        return {"code": self.code, "message": self.message}

    def as_record(self) -> dict:
        """As the store keeps it: with the upstream's advice on when to try again, if it gave any."""
        return self.as_json() | ({"retry_after": self.retry_after} if self.retry_after else {})


class UpstreamRateLimited(UpstreamError):
    status = HTTP_503_SERVICE_UNAVAILABLE


class UpstreamTimeout(UpstreamError):
    status = HTTP_504_GATEWAY_TIMEOUT
