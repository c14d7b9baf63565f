"""Every error leaves as JSON in OpenAI's shape: {"error": {message, type, param, code}}.

Errors nobody expected too: each request has an id (the X-Request-Id header), and a request
that fails on a bug answers 500 with that id, which the log line with the traceback also has.
A stream that already sent its 200 ends with an error event instead.
"""

from __future__ import annotations

import json
import logging
import uuid
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from memory.embedder import EmbedderError
from serve.chat import EngineFailed, UnknownCompanion, WrongBaseModel
from serve.engine import EngineUnavailable
from serve.groups import NeedsSpeaker, NotAMember
from serve.prompt import PromptTooLong
from store.companions import CompanionError
from store.history import UnknownConversation

log = logging.getLogger(__name__)
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 502: "engine_error", 503: "engine_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None   # a stream's 503 (its headers are gone): when to ask again


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which every 4xx and 5xx of ours has."""

    error: ErrorDetail


# Declared on every router; it also replaces FastAPI's default 422 (we answer 400 instead).
ERROR_RESPONSES: dict = {
    "4XX": {"model": ErrorResponse, "description": "The request was refused: the message says why "
            "(400 invalid, 401 no or wrong key, 404 not found or not yours, 409 conflict, 413 too "
            "large, 422 unreadable file, 429 over a limit, with Retry-After)"},
    "5XX": {"model": ErrorResponse, "description": "The engine failed (502) or is not ready (503, "
            "with Retry-After)"},
}


def raw_body(what: str) -> dict:
    """OpenAPI for a route that reads its body as raw bytes (an upload) rather than JSON."""
    return {"requestBody": {"required": True, "description": what, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def field_path(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    return path or "body"


def stream_error(err: Exception) -> dict:
    """The error event's body for a stream that failed after its 200 was sent."""
    if isinstance(err, EngineUnavailable):   # no header after the 200: retry_after says it
        body = error_body(503, str(err), code="engine_failed")
        body["error"]["retry_after"] = err.retry_after
        return body
    if isinstance(err, EngineFailed):
        body = error_body(502, str(err), code="engine_failed")
        if err.retryable:   # the stream broke; asked again, another worker (or the restarted engine) answers
            body["error"]["retry_after"] = 1
        return body
    if isinstance(err, UnknownConversation):   # deleted while the reply was being written
        return error_body(404, str(err), code="conversation_not_found")
    request_id = REQUEST_ID.get()
    log.error("request %s: the stream failed", request_id, exc_info=err)
    return error_body(500, f"the reply failed on the server (request id {request_id}; the server "
                           "log has the details)", code="internal_error")


class CatchAll:
    """ASGI middleware: a request id for every request, and a JSON 500 for any unexpected error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req_{uuid.uuid4().hex[:20]}"
        REQUEST_ID.set(request_id)
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            if started:   # the body was under way: all that can be done is to end it
                return
            body = json.dumps(error_body(500, f"the server failed on this request (request id "
                                              f"{request_id}; the server log has the details)",
                                         code="internal_error")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = field_path(tuple(first["loc"]))
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first['msg']}", "body",
                                  "invalid_json")
        got = first.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float) and len(repr(got)) < 80 else ""
        if first["type"] == "model_attributes_type" and param == "body":
            return error_response(400, "the body must be a JSON object sent with Content-Type: "
                                  "application/json", "body", "invalid_body")
        return error_response(400, f"{param}: {first['msg']}{shown}{more}", param, first["type"])

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    handlers = {
        UnknownCompanion: (404, "model", "model_not_found"),
        UnknownConversation: (404, None, "conversation_not_found"),
        WrongBaseModel: (409, "model", "base_model_mismatch"),
        NeedsSpeaker: (400, "speaker", "speaker_required"),
        NotAMember: (400, "speaker", "not_a_member"),
        PromptTooLong: (400, "messages", "context_length_exceeded"),
        CompanionError: (400, None, "invalid_card"),
        EngineFailed: (502, None, "engine_failed"),
        EmbedderError: (503, None, "embedder_unavailable"),   # a memory search with memory.embedder down
    }
    for exc_type, (status, param, code) in handlers.items():
        def handler(request: Request, exc: Exception, status=status, param=param, code=code):
            return error_response(status, str(exc), param, code)
        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request: Request, exc: EngineUnavailable):
        return error_response(503, str(exc), code="engine_unavailable",
                              headers={"Retry-After": str(exc.retry_after)})
