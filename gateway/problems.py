"""RFC 9457 problem details for every error the HTTP API returns.

One place turns each kind of failure into ``application/problem+json``: mailgrid errors
by their http_status, FastAPI's validation errors (422; a body that is not JSON at all
is 400), unknown routes and methods, oversized bodies (413), and anything unexpected
(500, logged, never a stack trace).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import TokenMissing
from mailgrid.errors import MailgridError, NotFound, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
# Seconds a client should wait before retrying a 503 (RFC 9110 10.2.3).
RETRY_AFTER = "5"
# Problem type URIs: "about:blank" means the HTTP status says it all (RFC 9457 4.2.1).
TYPE_PREFIX = "urn:mailgrid:problem:"


class ProblemResponse(JSONResponse):
    media_type = MEDIA_TYPE


def problem(status: int, detail: str, *, kind: str = "", title: str = "",
            headers: dict[str, str] | None = None, **extra: Any) -> ProblemResponse:
    """A problem+json response; ``kind`` names a mailgrid problem type."""
    body: dict[str, Any] = {
        "type": f"{TYPE_PREFIX}{kind}" if kind else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
        **extra,
    }
    return ProblemResponse(body, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _kind(err: MailgridError) -> str:
    """NotFound → 'not-found': the error class, in kebab case."""
    name = type(err).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


def from_error(err: MailgridError) -> ProblemResponse:
    headers: dict[str, str] = {}
    detail = err.detail
    if isinstance(err, TokenMissing):
        # RFC 6750 3: tell the client which scheme to use.
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(err, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    elif isinstance(err, NotFound):
        # The same answer whether the id is unknown or another user's: no oracle.
        detail = "No such resource."
    elif err.http_status == 503:
        headers["Retry-After"] = RETRY_AFTER
    elif err.http_status >= 500:
        detail = "Internal error."  # details of our failures stay in our logs
    if isinstance(err, Unavailable):
        detail = "A service this request needs is unavailable; try again later."
    return problem(err.http_status, detail, kind=_kind(err), title=err.title,
                   headers=headers or None)


async def _mailgrid_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, MailgridError)
    if exc.http_status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return from_error(exc)


async def _http_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, _BodyTooLarge):
        return _too_large(exc.limit)
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No route for {request.url.path}."
    headers = dict(exc.headers) if exc.headers else None
    return problem(exc.status_code, detail, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_clean_error(e) for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return problem(400, "The request body is not valid JSON.", kind="invalid-json",
                       errors=errors)
    return problem(422, "The request does not match the schema.", kind="validation",
                   errors=errors)


def _clean_error(error: Any) -> dict[str, Any]:
    """A validation error without the offending input echoed back or the ctx objects."""
    return {
        "loc": [str(part) for part in error.get("loc", ())],
        "msg": str(error.get("msg", "")),
        "type": str(error.get("type", "")),
    }


def install(app: FastAPI) -> None:
    """Registers the handlers that turn every error into problem+json."""
    app.add_exception_handler(MailgridError, _mailgrid_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class GuardMiddleware:
    """Outermost ASGI layer: bounds request bodies and hides unexpected errors.

    A body over ``max_body`` bytes (declared or streamed) is refused with 413 before
    the application reads it; an exception nobody handled becomes a logged 500
    problem, and the connection survives.
    """

    def __init__(self, app: ASGIApp, max_body: int,
                 route_limit: Callable[[str, str], int | None] | None = None) -> None:
        self.app = app
        self.max_body = max_body
        # (method, path) → a larger limit for routes that take whole messages.
        self.route_limit = route_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        if self.route_limit is not None:
            limit = self.route_limit(scope.get("method", ""), scope.get("path", "")) or limit
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._send_problem(send, _too_large(limit))
            return
        started = False
        received = 0

        async def guarded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._send_problem(send, _too_large(limit))
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await self._send_problem(send, problem(500, "Internal error."))

    @staticmethod
    async def _send_problem(send: Send, response: ProblemResponse) -> None:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions met reading a body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")
        self.limit = limit


def _too_large(limit: int) -> ProblemResponse:
    return problem(413, f"The request body is larger than {limit} bytes.", kind="too-large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
