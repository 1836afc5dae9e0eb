"""Accepting a message a user sends (DeliveryService.SubmitMessage).

The gateway has built the message (HTTP API) or received it (SMTP submission) and put
it in the blob store: the recipients' copy under ``blob_key`` and, when it differs (a Bcc
header), the sender's copy under ``sent_blob_key``. Here it is routed:

1. checked up front: the sender exists and owns ``mail_from``; every recipient in one
   of our domains has a mailbox (otherwise the whole submission is refused, naming the
   address, rather than accepted and bounced later);
2. local recipients: ONE InboundJob on mail.inbound (queue id = submission id), filed by
   the inbound workers exactly as mail from the MX, idempotent per recipient;
3. remote recipients: one OutboundJob per domain on mail.outbound.<domain>, the raw
   message as a blob reference (the outbound workers deliver it);
4. the sender's copy is filed in Sent (read), delivery key ``<submission id>:sent``;
5. a sent draft is deleted for good, now that Sent holds the message.

Queues before Sent: if a step fails the caller gets an error and nothing claims to be
sent that is not on its way. Every publish carries a Nats-Msg-Id derived from the
submission id, so a repeated submission within the stream's duplicate window (120 s)
queues nothing twice; mailbox copies are idempotent on their delivery keys for ever.
A repeat after the window may queue a remote domain's job again (at-least-once, as
an MTA retrying a lost 250 would).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext

from mailgrid import bus
from mailgrid.addresses import ascii_domain
from mailgrid.clients import MetadataClient
from mailgrid.errors import InvalidArgument, NotFound, PermissionDenied
from mailgrid.filing import parse_raw, store_attachments
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2, metadata_pb2

log = logging.getLogger(__name__)

SENT_FOLDER = "sent"
DRAFTS_FOLDER = "drafts"
@dataclass(frozen=True)
class Routing:
    """Where a submission's recipients go: local addresses, and remote ones by domain."""

    local: list[str]
    remote: dict[str, list[str]]


def route(settings: Settings, recipients: list[str]) -> Routing:
    """Splits the envelope recipients into local ones and remote ones grouped by domain.

    Each address counts once (compared without case); the order given is kept.
    """
    local: list[str] = []
    remote: dict[str, list[str]] = {}
    seen: set[str] = set()
    for rcpt in recipients:
        mailbox, at, domain = rcpt.rpartition("@")
        if not at or not mailbox or not domain or any(c in rcpt for c in "\r\n\0 <>"):
            raise InvalidArgument(f"recipient {rcpt!r} is not an address")
        try:
            name = ascii_domain(domain)
        except InvalidArgument as err:
            raise InvalidArgument(f"recipient <{rcpt}>: {err.detail}") from None
        address = f"{mailbox}@{name}"
        if address.lower() in seen:
            continue
        seen.add(address.lower())
        if settings.is_local_domain(name):
            local.append(address.lower())
        else:
            remote.setdefault(name, []).append(address)
    return Routing(local, remote)


def outbound_subject(domain: str) -> str:
    return f"{bus.OUTBOUND_PREFIX}.{domain}"


def outbound_job_id(submission_id: str, domain: str) -> str:
    return f"{submission_id}-{domain}"


class Submitter:
    """Carries out SubmitMessage against metadata_svc and the bus."""

    def __init__(self, settings: Settings, js: JetStreamContext,
                 metadata: MetadataClient) -> None:
        self.settings = settings
        self.js = js
        self.metadata = metadata

    async def submit(self, req: delivery_pb2.SubmitMessageRequest
                     ) -> delivery_pb2.SubmitMessageResponse:
        _check_request(req)
        if len(req.recipients) > self.settings.max_recipients:
            raise InvalidArgument(f"more than {self.settings.max_recipients} recipients")
        routing = route(self.settings, list(req.recipients))
        sent_key = req.sent_blob_key or req.blob_key
        # The checks and the read are independent lookups: one round trip, not three.
        sender, _, raw = await asyncio.gather(
            self._sender(req), self._check_local(routing.local), self._raw(sent_key))
        draft = await self._draft(sender.user_id, req.draft_email_id)
        parsed = await parse_raw(self.settings, raw)
        del raw
        message_id = parsed.message.message_id
        now = datetime.now(UTC)
        await asyncio.gather(
            self._publish_local(req, routing.local, now),
            *(self._publish_remote(req, domain, rcpts, message_id, now)
              for domain, rcpts in routing.remote.items()))
        await store_attachments(self.metadata, parsed)
        stored = await self.metadata.store_delivery(metadata_pb2.StoreDeliveryRequest(
            user_id=sender.user_id, delivery_key=f"{req.submission_id}:sent",
            folder_id=SENT_FOLDER, blob_key=sent_key,
            size=req.sent_size if req.sent_blob_key else req.size,
            parsed=parsed.message, is_read=True, received_at=_timestamp(now)))
        if draft:
            # Gone already on a repeated submission: nothing left to do.
            with contextlib.suppress(NotFound):
                await self.metadata.delete_message(sender.user_id, draft, permanent=True)
        log.info("submission %s from %s: sent %s, %d local, %d remote domain(s)%s",
                 req.submission_id, sender.address, stored.email_id, len(routing.local),
                 len(routing.remote), "" if stored.created else " (repeat)")
        return delivery_pb2.SubmitMessageResponse(sent_email_id=stored.email_id,
                                                  message_id=message_id)

    async def _raw(self, blob_key: str) -> bytes:
        try:
            return await self.metadata.get_blob(blob_key)
        except NotFound:
            raise InvalidArgument(f"blob {blob_key!r} is not in the blob store") from None

    async def _sender(self, req: delivery_pb2.SubmitMessageRequest) -> common_pb2.User:
        try:
            sender = await self.metadata.get_user(user_id=req.sender_user_id)
        except NotFound:
            raise PermissionDenied(f"no user {req.sender_user_id!r} to send as") from None
        if sender.address.lower() != req.mail_from.lower():
            raise PermissionDenied(f"<{req.mail_from}> is not the address of the sender")
        return sender

    async def _check_local(self, local: list[str]) -> None:
        """Refuses the submission if a recipient in our domains has no mailbox."""
        async def exists(address: str) -> bool:
            try:
                await self.metadata.get_user(address=address)
            except NotFound:
                return False
            return True

        found = await asyncio.gather(*(exists(a) for a in local))
        unknown = [a for a, ok in zip(local, found, strict=True) if not ok]
        if unknown:
            names = ", ".join(f"<{a}>" for a in unknown)
            raise InvalidArgument(f"unknown recipient {names}: no such mailbox here")

    async def _draft(self, user_id: str, draft_id: str) -> str:
        """The draft to delete after sending ('' if none, or already deleted)."""
        if not draft_id:
            return ""
        try:
            message = await self.metadata.get_message(user_id, draft_id)
        except NotFound:
            return ""  # a repeat: the first submission deleted it
        folders = await self.metadata.list_folders(user_id)
        drafts = {f.folder_id for f in folders if f.role == common_pb2.FOLDER_ROLE_DRAFTS}
        if message.folder_id not in drafts:
            raise InvalidArgument(f"message {draft_id} is not in Drafts")
        return draft_id

    async def _publish_local(self, req: delivery_pb2.SubmitMessageRequest,
                             local: list[str], now: datetime) -> None:
        if not local:
            return
        job = delivery_pb2.InboundJob(
            queue_id=req.submission_id, blob_key=req.blob_key, size=req.size,
            mail_from=req.mail_from, rcpt_to=local, received_at=_timestamp(now))
        await bus.publish(self.js, bus.INBOUND_SUBJECT, job.SerializeToString(),
                          msg_id=req.submission_id)

    async def _publish_remote(self, req: delivery_pb2.SubmitMessageRequest, domain: str,
                              rcpts: list[str], message_id: str, now: datetime) -> None:
        job = delivery_pb2.OutboundJob(
            job_id=outbound_job_id(req.submission_id, domain), blob_key=req.blob_key,
            size=req.size, mail_from=req.mail_from, sender_user_id=req.sender_user_id,
            domain=domain, rcpt_to=rcpts, queued_at=_timestamp(now), message_id=message_id,
            previous_attempts=0)
        await bus.publish(self.js, outbound_subject(domain), job.SerializeToString(),
                          msg_id=job.job_id)


def _check_request(req: delivery_pb2.SubmitMessageRequest) -> None:
    missing = [name for name in ("submission_id", "sender_user_id", "mail_from", "blob_key")
               if not getattr(req, name)]
    if not req.recipients:
        missing.append("recipients")
    if missing:
        raise InvalidArgument(f"SubmitMessage needs {', '.join(missing)}")
    if req.size < 0 or req.sent_size < 0:
        raise InvalidArgument("sizes must not be negative")


def _timestamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp
