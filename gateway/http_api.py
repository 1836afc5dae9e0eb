"""The HTTP API under /v1 (FastAPI), plus /healthz and /readyz.

Routes only translate: JSON in, a MetadataClient call with the token's user id, JSON
out. The user id comes from the bearer token and nowhere else, and metadata_svc scopes
every read and change by it, so another user's message is simply "not found".

Choices a client should know:
- Errors are RFC 9457 problem+json. A body that does not match the schema is 422
  (with an ``errors`` list); a body that is not JSON at all is 400; a JSON body over
  ``max_body`` bytes is 413.
- DELETE /v1/messages/{id} answers 200 {"permanent": bool}: false when the message was
  moved to Trash, true when it is gone for good (it was in Trash, or ?permanent=true).
- A folder's role name (inbox, sent, drafts, trash, spam, archive) works wherever a
  folder id does.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway import problems
from gateway.auth import TokenMissing, TokenSigner
from gateway.checks_out import SpamOut, checks_fields
from gateway.filenames import safe_filename
from gateway.http_session import LoginThrottle, client_ip
from mailgrid.clients import MetadataClient
from mailgrid.errors import InvalidArgument, NotFound, Unauthenticated
from mailgrid.ids import parse_timeuuid
from mailgrid.v1 import common_pb2

MiB = 1024 * 1024
# Largest JSON request body; messages themselves arrive over SMTP or multipart uploads.
MAX_JSON_BODY = 1 * MiB
_ROLE_PREFIX = "FOLDER_ROLE_"
# A content type we pass on as is; anything else is served as application/octet-stream.
_SAFE_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_FALLBACK_FILENAME = re.compile(r"[^A-Za-z0-9 !#$&+,.;=@^_`{}~()\[\]-]")

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


# ---- schemas -------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenRequest(_Strict):
    address: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class Address(BaseModel):
    name: str
    email: str


class FolderOut(BaseModel):
    id: str
    name: str
    role: str
    total: int
    unread: int


class FolderList(BaseModel):
    folders: list[FolderOut]


class SummaryOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    folder_id: str
    thread_id: str
    from_: Address = Field(alias="from")
    subject: str
    preview: str
    date: datetime | None
    is_read: bool
    is_starred: bool
    has_attachments: bool
    size: int


class MessageList(BaseModel):
    messages: list[SummaryOut]
    next_cursor: str | None


class AttachmentOut(BaseModel):
    id: str
    filename: str
    content_type: str
    size: int
    inline: bool
    content_id: str


class MessageOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    folder_id: str
    thread_id: str
    message_id: str
    from_: Address = Field(alias="from")
    to: list[Address]
    cc: list[Address]
    bcc: list[Address]
    reply_to: list[Address]
    subject: str
    date: datetime | None
    received_at: datetime | None
    in_reply_to: str
    references: list[str]
    text: str
    html: str
    attachments: list[AttachmentOut]
    is_read: bool
    is_starred: bool
    size: int
    # The inbound checks (gateway/checks_out.py); null for mail that skipped them.
    authentication_results: str | None = None
    spam: SpamOut | None = None
    filing_reason: str | None = None
    virus: str | None = None


class MessagePatch(_Strict):
    is_read: bool | None = None
    is_starred: bool | None = None
    folder_id: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _something_to_change(self) -> MessagePatch:
        if self.is_read is None and self.is_starred is None and self.folder_id is None:
            raise ValueError("give at least one of is_read, is_starred, folder_id")
        return self


class DeleteResult(BaseModel):
    permanent: bool


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = {}


# ---- conversions ---------------------------------------------------------------------

def _time(stamp: Timestamp) -> datetime | None:
    if not stamp.seconds and not stamp.nanos:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def _address(addr: common_pb2.EmailAddress) -> dict[str, str]:
    return {"name": addr.name, "email": addr.email}


def role_name(role: common_pb2.FolderRole.ValueType) -> str:
    """FOLDER_ROLE_INBOX → 'inbox'; a folder without a role is 'custom'."""
    if role == common_pb2.FOLDER_ROLE_UNSPECIFIED:
        return "custom"
    return common_pb2.FolderRole.Name(role).removeprefix(_ROLE_PREFIX).lower()


def summary_out(s: common_pb2.MessageSummary) -> SummaryOut:
    return SummaryOut.model_validate({
        "id": s.email_id, "folder_id": s.folder_id, "thread_id": s.thread_id,
        "from": _address(getattr(s, "from")), "subject": s.subject, "preview": s.preview,
        "date": _time(s.date), "is_read": s.is_read, "is_starred": s.is_starred,
        "has_attachments": s.has_attachments, "size": s.size,
    })


def message_out(m: common_pb2.Message) -> MessageOut:
    return MessageOut.model_validate({
        "id": m.email_id, "folder_id": m.folder_id, "thread_id": m.thread_id,
        "message_id": m.message_id, "from": _address(getattr(m, "from")),
        "to": [_address(a) for a in m.to], "cc": [_address(a) for a in m.cc],
        "bcc": [_address(a) for a in m.bcc],
        "reply_to": [_address(a) for a in m.reply_to],
        "subject": m.subject, "date": _time(m.date), "received_at": _time(m.received_at),
        "in_reply_to": m.in_reply_to, "references": list(m.references),
        "text": m.text, "html": m.html,
        "attachments": [
            {"id": a.attachment_id, "filename": a.filename, "content_type": a.content_type,
             "size": a.size, "inline": a.inline, "content_id": a.content_id}
            for a in m.attachments
        ],
        "is_read": m.is_read, "is_starred": m.is_starred, "size": m.size,
        **checks_fields(m),
    })


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact one (RFC 6266 4.3)."""
    name = safe_filename(filename)  # no paths, controls, bidi overrides; bounded
    fallback = _FALLBACK_FILENAME.sub("_", name)
    exact = urllib.parse.quote(name, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


def safe_content_type(content_type: str) -> str:
    value = content_type.strip().lower()
    return value if _SAFE_CONTENT_TYPE.match(value) else "application/octet-stream"


def _email_id(message_id: str) -> str:
    """The id as metadata_svc spells it; anything that is no TIMEUUID is not found."""
    try:
        return str(parse_timeuuid(message_id))
    except ValueError:
        raise NotFound("no such message") from None


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


# Served content is mail from strangers: never sniffed, never run as a page.
_UNTRUSTED_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox",
}


# ---- application ---------------------------------------------------------------------

@dataclass(frozen=True)
class ApiDeps:
    """What the routes need; built by GatewayApp, never global."""

    metadata: MetadataClient
    signer: TokenSigner
    readiness: ReadinessCheck
    # Routers of other modules, mounted under /v1 (e.g. gateway.http_send).
    routers: tuple[APIRouter, ...] = ()
    # Routers mounted at the root, outside /v1 (the webmail page: gateway.webmail).
    pages: tuple[APIRouter, ...] = ()
    # (method, path) → a larger body limit than max_body for that route, or None.
    body_limit: Callable[[str, str], int | None] | None = None
    # Failed-login counts per client IP and address (429 past the limit); None: off.
    login_throttle: LoginThrottle | None = None


_BEARER = HTTPBearer(auto_error=False, description="A token from POST /v1/auth/token")


async def _current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> str:
    """The user id of the request's bearer token: the only source of a user id."""
    if credentials is None:
        raise TokenMissing("an Authorization: Bearer token is required")
    signer: TokenSigner = request.app.state.signer
    return signer.verify(credentials.credentials)


# Module level: FastAPI resolves parameter annotations in the module's namespace.
User = Annotated[str, Depends(_current_user)]


def build_app(deps: ApiDeps, max_body: int = MAX_JSON_BODY) -> FastAPI:
    app = FastAPI(
        title="mailgrid",
        version="1",
        summary="Read and organise mail: folders, messages, flags, raw bytes, attachments.",
    )
    app.state.signer = deps.signer
    problems.install(app)
    app.add_middleware(problems.GuardMiddleware, max_body=max_body,
                       route_limit=deps.body_limit)
    app.include_router(_health_routes(deps))
    app.include_router(_auth_routes(deps), prefix="/v1")
    app.include_router(_mail_routes(deps), prefix="/v1")
    for router in deps.routers:
        app.include_router(router, prefix="/v1")
    for router in deps.pages:
        app.include_router(router)
    return app


def _health_routes(deps: ApiDeps) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @router.get("/readyz", responses={503: {"description": "A dependency is down"}})
    async def readyz() -> Any:
        """metadata_svc answers and NATS is connected."""
        checks = await deps.readiness()
        if all(checks.values()):
            return Health(status="ready", checks=checks)
        down = ", ".join(sorted(name for name, ok in checks.items() if not ok))
        return problems.problem(503, f"not ready: {down}", kind="not-ready",
                                headers={"Retry-After": problems.RETRY_AFTER},
                                checks=checks)

    return router


def _auth_routes(deps: ApiDeps) -> APIRouter:
    router = APIRouter(tags=["auth"])

    @router.post("/auth/token", responses={
        401: {"description": "Wrong address or password"},
        429: {"description": "Too many failed logins from this client or for this address"}})
    async def issue_token(body: TokenRequest, request: Request) -> TokenResponse:
        """Exchanges an address and password for a bearer token."""
        throttle, ip = deps.login_throttle, client_ip(request)
        if throttle is not None:
            throttle.check(ip, body.address)  # 429 before the password is even looked at
        try:
            user = await deps.metadata.authenticate(body.address, body.password)
        except (Unauthenticated, NotFound, InvalidArgument):
            if throttle is not None:
                throttle.failed(ip, body.address)
            # One answer for an unknown user and a wrong password: no address oracle.
            raise Unauthenticated("wrong address or password") from None
        if throttle is not None:
            throttle.succeeded(body.address)
        return TokenResponse(access_token=deps.signer.issue(user.user_id),
                             expires_in=deps.signer.ttl)

    return router


def _mail_routes(deps: ApiDeps) -> APIRouter:
    router = APIRouter(tags=["mail"], responses={
        401: {"description": "Missing, invalid or expired token"},
        404: {"description": "No such folder or message (or not yours)"},
    })
    md = deps.metadata

    @router.get("/folders")
    async def list_folders(user: User) -> FolderList:
        folders = await md.list_folders(user)
        return FolderList(folders=[
            FolderOut(id=f.folder_id, name=f.name, role=role_name(f.role),
                      total=f.total, unread=f.unread)
            for f in folders
        ])

    @router.get("/folders/{folder_id}/messages")
    async def list_messages(
        user: User,
        folder_id: str,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str, Query(max_length=1000)] = "",
        unread: bool = False,
    ) -> MessageList:
        """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
        page = await md.list_messages(user, folder_id, page_size=limit, page_token=cursor,
                                      unread_only=unread)
        return MessageList(messages=[summary_out(s) for s in page.messages],
                           next_cursor=page.next_page_token or None)

    @router.get("/messages/{message_id}")
    async def get_message(user: User, message_id: str) -> MessageOut:
        return message_out(await md.get_message(user, _email_id(message_id)))

    @router.get("/messages/{message_id}/raw", response_class=StreamingResponse,
                responses={200: {"content": {"message/rfc822": {}}}})
    async def get_raw(user: User, message_id: str) -> StreamingResponse:
        """The message exactly as it was received, Received header included."""
        chunks = md.raw_message(user, _email_id(message_id))
        first = await anext(chunks, None)  # a missing message fails here, before 200
        return StreamingResponse(_prepend(first, chunks), media_type="message/rfc822",
                                 headers=_UNTRUSTED_HEADERS)

    @router.get("/messages/{message_id}/attachments/{attachment_id}",
                response_class=StreamingResponse,
                responses={200: {"content": {"application/octet-stream": {}}}})
    async def get_attachment(user: User, message_id: str,
                             attachment_id: str) -> StreamingResponse:
        attachment, body = await md.attachment(user, _email_id(message_id), attachment_id)
        headers = {"Content-Disposition": content_disposition(attachment.filename),
                   **_UNTRUSTED_HEADERS}
        return StreamingResponse(body, media_type=safe_content_type(attachment.content_type),
                                 headers=headers)

    @router.patch("/messages/{message_id}")
    async def update_message(user: User, message_id: str, patch: MessagePatch) -> SummaryOut:
        """Sets flags and/or moves the message (folder id or role name)."""
        summary = await md.update_message(user, _email_id(message_id),
                                          is_read=patch.is_read, is_starred=patch.is_starred,
                                          folder_id=patch.folder_id)
        return summary_out(summary)

    @router.delete("/messages/{message_id}")
    async def delete_message(user: User, message_id: str,
                             permanent: bool = False) -> DeleteResult:
        """Moves the message to Trash; from Trash, or with permanent=true, deletes it."""
        gone = await md.delete_message(user, _email_id(message_id), permanent=permanent)
        return DeleteResult(permanent=gone)

    return router
