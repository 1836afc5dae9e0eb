"""Sending mail over the HTTP API: POST /v1/messages and the drafts.

The body is JSON, or multipart/form-data with the same JSON in a ``message`` part and
one ``attachments`` file part per attachment. Fields are checked strictly: unknown or
mistyped fields are 422 (as everywhere in the API); a line break or NUL in any header
field, an address that is not one RFC 5322 address, or a send without recipients is
400 with a ``field`` member naming the field (``to[1]``, ``attachments[0].filename``);
a message over ``max_message_size`` once built is 413.

The message is built here (From = the token's user, Date, Message-ID in the user's
domain), its bytes put in the blob store (twice when it has Bcc: the recipients' copy
has no Bcc header), then handed to delivery_svc's SubmitMessage, which files it in
Sent and routes it; 202 means it is durably on its way.

Drafts live in the Drafts folder as whole messages. ``PUT /v1/drafts/{id}`` stores the
new version and deletes the old one for good: the draft gets a NEW id, returned in
the answer (metadata_svc has no in-place replace; ids are time-ordered and immutable).
``POST /v1/drafts/{id}/send`` sends the stored message with a new Date and
Message-ID, and removes the draft once Sent holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from gateway import compose, problems
from gateway.compose import Composition, FieldError, Rendered
from gateway.http_api import User
from mailgrid.clients import DeliveryClient, MetadataClient
from mailgrid.errors import NotFound, TooLarge
from mailgrid.filing import parse_raw, store_attachments
from mailgrid.ids import new_queue_id, parse_timeuuid
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2, metadata_pb2

log = logging.getLogger(__name__)

JSON = "application/json"
MULTIPART = "multipart/form-data"
MAX_SUBJECT = 4096
MAX_ATTACHMENTS = 100
# Multipart framing and JSON escaping on top of the message size itself.
BODY_OVERHEAD = 1024 * 1024


class MessageIn(BaseModel):
    """What a user sends (or keeps as a draft)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    to: list[str] = Field(default_factory=list, max_length=1000)
    cc: list[str] = Field(default_factory=list, max_length=1000)
    bcc: list[str] = Field(default_factory=list, max_length=1000)
    subject: str = Field(default="", max_length=MAX_SUBJECT)
    text: str = ""
    html: str | None = None
    # An email id of the user's mailbox, or a Message-ID ("<id@host>").
    in_reply_to: str | None = Field(default=None, max_length=1000)


class SendAccepted(BaseModel):
    # The sender's copy in Sent.
    id: str
    # Its Message-ID, without angle brackets (as GET /v1/messages/{id} shows it).
    message_id: str


class DraftOut(BaseModel):
    id: str


_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": MessageIn.model_json_schema()},
            MULTIPART: {"schema": {
                "type": "object",
                "required": ["message"],
                "properties": {
                    "message": {"type": "string", "description": "the JSON body as above"},
                    "attachments": {"type": "array",
                                    "items": {"type": "string", "format": "binary"}},
                },
            }},
        },
    },
}


@dataclass(frozen=True)
class SendDeps:
    metadata: MetadataClient
    delivery: DeliveryClient
    settings: Settings

    @property
    def body_limit(self) -> int:
        return max_request_body(self.settings)


def max_request_body(settings: Settings) -> int:
    return settings.max_message_size + BODY_OVERHEAD


def body_limit(settings: Settings) -> Callable[[str, str], int | None]:
    """The request body limit of the send routes (the rest keep the API's default)."""
    limit = max_request_body(settings)

    def for_route(method: str, path: str) -> int | None:
        if method in ("POST", "PUT") and (path == "/v1/messages"
                                          or path.startswith("/v1/drafts")):
            return limit
        return None

    return for_route


def field_problem(err: FieldError) -> problems.ProblemResponse:
    return problems.problem(400, err.detail, kind="invalid-field", title="Invalid field",
                            field=err.field)


# ---- reading a request ---------------------------------------------------------------

async def read_request(request: Request, limit: int) -> tuple[MessageIn, list[compose.Attachment]]:
    """The message fields and attachments of a JSON or multipart body."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == JSON:
        return _model(await request.body()), []
    if media != MULTIPART:
        raise _UnsupportedMedia()
    form = await request.form(max_files=MAX_ATTACHMENTS, max_fields=10, max_part_size=limit)
    try:
        unknown = sorted(set(form.keys()) - {"message", "attachments"})
        if unknown:
            raise FieldError(unknown[0], "unknown form part (expected message, attachments)")
        parts = form.getlist("message")
        if len(parts) != 1:
            raise FieldError("message", "exactly one message part (JSON) is required")
        part = parts[0]
        body = await part.read() if isinstance(part, UploadFile) else part.encode("utf-8")
        message = _model(body)
        files = []
        for index, item in enumerate(form.getlist("attachments")):
            if not isinstance(item, UploadFile):
                raise FieldError(f"attachments[{index}]", "must be a file part")
            data = await item.read()
            files.append(compose.check_attachment(
                index, item.filename or "", item.content_type or "", data))
    finally:
        await form.close()
    return message, files


def _model(body: bytes) -> MessageIn:
    try:
        return MessageIn.model_validate_json(body)
    except ValidationError as err:
        # The API's validation answer: 422 (400 when the body is not JSON at all).
        raise RequestValidationError(err.errors(include_url=False, include_input=False)
                                     ) from None


class _UnsupportedMedia(Exception):
    pass


def unsupported_media() -> problems.ProblemResponse:
    return problems.problem(415, f"Send {JSON} or {MULTIPART}.", kind="unsupported-media")


# ---- composing -----------------------------------------------------------------------

def check_fields(body: MessageIn) -> None:
    compose.check_text("subject", body.subject)
    compose.check_text("text", body.text, multiline=True)
    if body.html is not None:
        compose.check_text("html", body.html, multiline=True)
    if body.in_reply_to is not None:
        compose.check_text("in_reply_to", body.in_reply_to)


async def composition(md: MetadataClient, sender: common_pb2.User, body: MessageIn,
                      files: list[compose.Attachment]) -> Composition:
    check_fields(body)
    comp = Composition(
        sender=Address(addr_spec=sender.address),
        to=compose.check_addresses("to", body.to),
        cc=compose.check_addresses("cc", body.cc),
        bcc=compose.check_addresses("bcc", body.bcc),
        subject=body.subject, text=body.text, html=body.html, attachments=files)
    if body.in_reply_to:
        comp.in_reply_to, comp.references = await reply_to(md, sender.user_id,
                                                           body.in_reply_to)
    return comp


async def reply_to(md: MetadataClient, user_id: str, value: str) -> tuple[str, list[str]]:
    """In-Reply-To and References for a reply to an email id or a Message-ID."""
    try:
        email_id = str(parse_timeuuid(value.strip()))
    except ValueError:
        message_id = compose.check_message_id("in_reply_to", value)
        return message_id, [message_id]
    try:
        parent = await md.get_message(user_id, email_id)
    except NotFound:
        raise FieldError("in_reply_to", "no such message in your mailbox") from None
    return compose.reply_references(parent.message_id, parent.references,
                                    parent.in_reply_to)


def new_message_id(sender: common_pb2.User) -> str:
    return make_msgid(domain=sender.address.rpartition("@")[2])


def render(settings: Settings, msg: EmailMessage, message_id: str) -> Rendered:
    rendered = compose.render(msg, message_id)
    if len(rendered.sent) > settings.max_message_size:
        raise TooLarge(f"the message is {len(rendered.sent)} bytes, more than the "
                       f"{settings.max_message_size} bytes allowed")
    return rendered


# ---- the routes ----------------------------------------------------------------------

def send_routes(deps: SendDeps) -> APIRouter:
    router = APIRouter(tags=["send"], responses={
        400: {"description": "A field is not acceptable (the problem names it)"},
        401: {"description": "Missing, invalid or expired token"},
        413: {"description": "The message is too large"},
        415: {"description": "Neither JSON nor multipart/form-data"},
    })
    md = deps.metadata

    async def read(request: Request) -> tuple[MessageIn, list[compose.Attachment]]:
        return await read_request(request, deps.body_limit)

    @router.post("/messages", status_code=202, openapi_extra=_OPENAPI_BODY)
    async def send_message(user: User, request: Request) -> Any:
        """Sends a message; 202 once it is in Sent and queued for every recipient."""
        try:
            body, files = await read(request)
            sender = await md.get_user(user_id=user)
            comp = await composition(md, sender, body, files)
            if not comp.recipients():
                raise FieldError("to", "at least one recipient (to, cc or bcc) is required")
            message_id = new_message_id(sender)
            msg = compose.build(comp, now=datetime.now(UTC), message_id=message_id)
            return await submit(deps, sender, render(deps.settings, msg, message_id))
        except FieldError as err:
            return field_problem(err)
        except _UnsupportedMedia:
            return unsupported_media()

    @router.post("/drafts", status_code=201, openapi_extra=_OPENAPI_BODY)
    async def create_draft(user: User, request: Request) -> Any:
        """Keeps a message in Drafts (recipients optional); answers its id."""
        try:
            body, files = await read(request)
            return DraftOut(id=await store_draft(deps, user, body, files))
        except FieldError as err:
            return field_problem(err)
        except _UnsupportedMedia:
            return unsupported_media()

    @router.put("/drafts/{draft_id}", openapi_extra=_OPENAPI_BODY)
    async def replace_draft(user: User, draft_id: str, request: Request) -> Any:
        """Replaces a draft; answers the NEW id (the old one is gone)."""
        old = await find_draft(md, user, draft_id)
        try:
            body, files = await read(request)
            new_id = await store_draft(deps, user, body, files)
        except FieldError as err:
            return field_problem(err)
        except _UnsupportedMedia:
            return unsupported_media()
        # Gone already if another request replaced it concurrently: both versions stay.
        with contextlib.suppress(NotFound):
            await md.delete_message(user, old, permanent=True)
        return DraftOut(id=new_id)

    @router.post("/drafts/{draft_id}/send", status_code=202)
    async def send_draft(user: User, draft_id: str) -> Any:
        """Sends a draft as stored (new Date and Message-ID); removes it from Drafts."""
        email_id = await find_draft(md, user, draft_id)
        try:
            sender = await md.get_user(user_id=user)
            raw = b"".join([chunk async for chunk in md.raw_message(user, email_id)])
            message_id = new_message_id(sender)
            msg = await asyncio.to_thread(
                compose.reissue, raw, Address(addr_spec=sender.address),
                now=datetime.now(UTC), message_id=message_id)
            rendered = render(deps.settings, msg, message_id)
            if not rendered.recipients:
                raise FieldError("to", "the draft has no recipients")
            return await submit(deps, sender, rendered, draft_email_id=email_id)
        except FieldError as err:
            return field_problem(err)

    return router


async def find_draft(md: MetadataClient, user_id: str, draft_id: str) -> str:
    """The email id of the user's draft ``draft_id``; NotFound unless it is in Drafts."""
    try:
        email_id = str(parse_timeuuid(draft_id))
    except ValueError:
        raise NotFound("no such draft") from None
    message = await md.get_message(user_id, email_id)
    folders = await md.list_folders(user_id)
    if not any(f.folder_id == message.folder_id and f.role == common_pb2.FOLDER_ROLE_DRAFTS
               for f in folders):
        raise NotFound("no such draft")
    return email_id


async def store_draft(deps: SendDeps, user_id: str, body: MessageIn,
                      files: list[compose.Attachment]) -> str:
    md = deps.metadata
    sender = await md.get_user(user_id=user_id)
    comp = await composition(md, sender, body, files)
    message_id = new_message_id(sender)
    msg = compose.build(comp, now=datetime.now(UTC), message_id=message_id)
    raw = render(deps.settings, msg, message_id).sent  # a draft keeps its Bcc
    put = await md.put_blob(raw)
    parsed = await parse_raw(deps.settings, raw)
    await store_attachments(md, parsed)
    stored = await md.store_delivery(metadata_pb2.StoreDeliveryRequest(
        user_id=user_id, delivery_key=f"draft:{new_queue_id()}", folder_id="drafts",
        blob_key=put.blob_key, size=len(raw), parsed=parsed.message, is_read=True))
    return stored.email_id


async def submit(deps: SendDeps, sender: common_pb2.User, rendered: Rendered,
                 draft_email_id: str = "") -> SendAccepted:
    """Stores the bytes and hands the message to delivery_svc; durable on return."""
    md = deps.metadata
    if rendered.same:
        outgoing = sent = await md.put_blob(rendered.outgoing)
    else:
        outgoing, sent = await asyncio.gather(md.put_blob(rendered.outgoing),
                                              md.put_blob(rendered.sent))
    req = delivery_pb2.SubmitMessageRequest(
        submission_id=new_queue_id(), sender_user_id=sender.user_id,
        mail_from=sender.address, recipients=rendered.recipients,
        blob_key=outgoing.blob_key, size=len(rendered.outgoing),
        draft_email_id=draft_email_id)
    if not rendered.same:
        req.sent_blob_key, req.sent_size = sent.blob_key, len(rendered.sent)
    reply = await deps.delivery.submit_message(req)
    log.info("user %s sent %s to %d recipient(s) (submission %s)", sender.user_id,
             reply.message_id, len(rendered.recipients), req.submission_id)
    return SendAccepted(id=reply.sent_email_id, message_id=reply.message_id)

