"""Every HTTP error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`to_api_error` maps what can go wrong onto a status and that body (also used for the error
event of a stream that fails midway); `install_error_handlers` makes FastAPI answer with it;
`RequestGuard` answers 401 and 413 before FastAPI reads a byte of JSON.
"""

import hmac
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.sampling_params import ParamError
from cluster.engine_client import EngineDeadError, EngineOverloadedError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait before retrying
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without a key


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(model: str, served: str) -> APIError:
    message = f"The model '{model}' does not exist; this server serves '{served}'"
    return APIError(404, message, type="not_found_error", param="model", code="model_not_found")


def to_api_error(exc: Exception) -> APIError:
    match exc:
        case APIError():
            return exc
        case ParamError():
            return APIError(400, str(exc), param=exc.param)
        case RequestValidationError():
            return _validation_error(exc)
        case EngineOverloadedError():
            return APIError(
                429,
                f"The server is overloaded, retry in {RETRY_AFTER_S} s ({exc})",
                type="rate_limit_error",
                code="engine_overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        case EngineDeadError():
            message = f"The model engine is unavailable: {exc}"
            return APIError(503, message, type="service_unavailable_error", code="engine_dead")
        case HTTPException():
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers)
        case _:
            return APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error, its location as the param: ("body", "messages", 0, "role")
    -> "messages.0.role". A ParamError raised inside a validator names its own param."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ParamError):
        return APIError(400, f"{cause.param}: {cause.message}", param=cause.param)
    if error["loc"] == ("body",):
        return APIError(400, f"The request body must be a JSON object: {error['msg']}")
    loc = error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"]
    param = ".".join(str(part) for part in loc) or None
    message = str(cause) if error["type"] == "value_error" and cause is not None else error["msg"]
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        error = to_api_error(exc)
        if error.status >= 500:
            logger.error("request failed with %d: %s", error.status, error.message, exc_info=exc)
        return error.response()

    for exc_class in (APIError, ParamError, RequestValidationError, EngineOverloadedError,
                      EngineDeadError, HTTPException, Exception):
        app.add_exception_handler(exc_class, handle)


class RequestGuard:
    """ASGI middleware: 401 for a missing or wrong `Authorization: Bearer <api_key>` (when a
    key is configured), 413 for a body over `max_body_bytes`. It reads the body itself (never
    more than the limit plus one chunk) and replays it to the app."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            error = APIError(
                401,
                "Missing or incorrect API key; send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await error.response()(scope, receive, send)
        too_large = APIError(
            413, f"The request body exceeds {self.max_body_bytes} bytes", code="request_too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        expected = (self.api_key or "").encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), expected)
