"""One error shape for every route: `{"error": {"message", "type", "param", "code"}}`.

Engine `RequestError`s carry their own `.status`/`.code`/`.param`; FastAPI's validation errors
(malformed JSON, wrong types) become 400s; unknown routes and methods keep their 404/405.
LoRAX routes add a top-level `error_type` (validation, overloaded, generation) that
lorax-client reads to pick its exception class.
"""
from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.engine.core.errors import RequestError

log = logging.getLogger("loraplex.engine.api")

ERROR_TYPES = {
    400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
    413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
    401: "authentication_error", 403: "permission_error", 424: "adapter_error",
    429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
}
LORAX_PATHS = frozenset({"/", "/generate", "/generate_stream"})
# lorax-client maps error_type first, then the HTTP status (404 NotFound, 424 ShardNotReady, ...).
LORAX_ERROR_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded", 500: "generation"}


class APIError(Exception):
    """An error raised by a route; rendered as the OpenAI error shape with `status`."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type_: str | None = None, extra: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or error_type(status)
        self.extra = extra or {}
        self.headers = headers  # e.g. Retry-After on a 503

    @classmethod
    def from_request_error(cls, exc: RequestError) -> "APIError":
        retry_after = getattr(exc, "retry_after", None)
        return cls(exc.status, str(exc), code=exc.code, param=exc.param,
                   headers={"Retry-After": str(retry_after)} if retry_after else None)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                **self.extra}


class ClientGone(Exception):
    """The client disconnected before a non-streamed answer was ready."""


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "server_error"


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError.from_request_error(exc)
    return APIError(500, "internal server error", code="internal_error")


def lorax_error_type(status: int) -> str | None:
    return LORAX_ERROR_TYPES.get(status)


def render(err: APIError, path: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = err.body()
    if path in LORAX_PATHS and lorax_error_type(err.status):
        body["error_type"] = lorax_error_type(err.status)
    return JSONResponse(body, status_code=err.status, headers=headers)


def finite(x: float) -> float:
    """JSON has no -inf/NaN: clamp what log-softmax can produce."""
    return x if math.isfinite(x) else -9999.0


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return render(exc, request.url.path, headers=exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        err = APIError.from_request_error(exc)
        return render(err, request.url.path, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return render(APIError(400, message, code="invalid_value" if param else "invalid_request", param=param),
                      request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 404 and exc.detail in (None, "Not Found"):
            message = f"no route {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return render(APIError(status, message, code=code), request.url.path, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render(APIError(500, "internal server error", code="internal_error"), request.url.path)
