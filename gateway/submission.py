"""The SMTP submission listener (RFC 6409): mail from our users' clients to anywhere.

The MX protocol and handler (gateway.smtp) with the submission policy on top:
- STARTTLS with the configured or a self-signed certificate (gateway.tls);
- AUTH PLAIN and LOGIN checked against metadata_svc, offered only after STARTTLS (RFC
  4954 4: 538 5.7.11 before) unless ``submission_auth_plaintext_loopback`` allows it for
  clients on a loopback address;
- MAIL, RCPT and DATA only once authenticated (530 5.7.0); bad credentials 535 5.7.8,
  and after ``submission_auth_max_failures`` failures from one IP within the window any
  AUTH gets 421 4.7.0 and the connection is closed;
- MAIL FROM and every From header address must be the user's own (553 5.7.1);
- RCPT to any domain (this is submission), our own domains only to existing mailboxes;
- on DATA (bare CR/LF refused as at the MX): our Received header, Date and Message-ID
  added when missing (RFC 6409 8.2, 8.3), From added when missing, and the recipients'
  copy without Bcc; then DeliveryService.SubmitMessage, and ``250`` only once it is
  durable (failures are 451 4.3.0: the client keeps the message and retries).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict, deque
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax
from nats.aio.client import Client as NATS

from gateway import compose
from gateway.smtp import (
    R_BAD_ADDRESS,
    R_ROUTING_DENIED,
    R_TEMPORARY,
    R_TOO_MANY_RCPT,
    MxHandler,
    MxListener,
    MxSMTP,
    temporary,
)
from mailgrid.addresses import ascii_domain
from mailgrid.clients import DeliveryClient, MetadataClient
from mailgrid.errors import (
    InvalidArgument,
    MailgridError,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
)
from mailgrid.ids import new_queue_id
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2

log = logging.getLogger(__name__)

R_AUTH_OK = "235 2.7.0 Authentication successful"
R_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
R_AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
R_AUTH_BLOCKED = "421 4.7.0 Too many failed authentication attempts, try again later"
R_NOT_YOUR_SENDER = "553 5.7.1 Sender address rejected: not owned by the authenticated user"
R_NOT_YOUR_FROM = "553 5.7.1 From header address not owned by the authenticated user"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
# Most client IPs whose failures are remembered (the oldest are forgotten first).
MAX_TRACKED_CLIENTS = 100_000


class AuthGuard:
    """Counts failed AUTH attempts per client IP within a sliding window."""

    def __init__(self, max_failures: int, window: float,
                 clock: Any = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, ip: str) -> bool:
        return self.max_failures > 0 and len(self._recent(ip)) >= self.max_failures

    def failed(self, ip: str) -> None:
        self._recent(ip).append(self.clock())
        self._failures.move_to_end(ip)
        while len(self._failures) > MAX_TRACKED_CLIENTS:
            self._failures.popitem(last=False)

    def _recent(self, ip: str) -> deque[float]:
        times = self._failures.setdefault(ip, deque())
        horizon = self.clock() - self.window
        while times and times[0] < horizon:
            times.popleft()
        return times


def _capture(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
             auth_data: Any) -> AuthResult:
    """aiosmtpd's (synchronous) authenticator: only hands the decoded credentials on.

    It never says yes: the check is asynchronous (SubmissionSMTP._verify), and a
    mechanism that reached this without passing through _verify fails closed.
    """
    return AuthResult(success=False, handled=False, auth_data=auth_data)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class SubmissionSMTP(MxSMTP):
    """MxSMTP with STARTTLS and AUTH, the credentials checked against metadata_svc."""

    def __init__(self, handler: SubmissionHandler, settings: Settings,
                 loop: asyncio.AbstractEventLoop, sessions: set[MxSMTP],
                 on_data_done: Any, tls_context: ssl.SSLContext,
                 guard: AuthGuard) -> None:
        super().__init__(handler, settings, loop, sessions, on_data_done,
                         tls_context=tls_context, auth_required=True, auth_require_tls=True,
                         authenticator=_capture)
        # RFC 4954 4: only mechanisms we check ourselves.
        self._auth_methods = {k: v for k, v in self._auth_methods.items()
                              if k in ("PLAIN", "LOGIN")}
        self.metadata = handler.metadata
        self.guard = guard
        self.plaintext_loopback = settings.submission_auth_plaintext_loopback

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Set after __init__: aiosmtpd warns about AUTH without TLS, and here only
        # loopback clients (the machine's own, e.g. a local webmail) are let off.
        if self.plaintext_loopback and is_loopback(self.client_ip):
            self._auth_require_tls = False

    @property
    def client_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.guard.blocked(self.client_ip):
            log.warning("AUTH from %s refused: too many failures", self.client_ip)
            await self.push(R_AUTH_BLOCKED)
            if self.transport is not None:
                self.transport.close()
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(server, args))

    async def _verify(self, captured: AuthResult) -> AuthResult:
        """The captured credentials checked against the user store."""
        creds = captured.auth_data
        if not isinstance(creds, LoginPassword):
            return captured  # nothing decoded (aiosmtpd has answered), or aborted
        try:
            login, password = creds.login.decode("utf-8"), creds.password.decode("utf-8")
            user = await self.metadata.authenticate(login, password)
        except (UnicodeDecodeError, Unauthenticated, NotFound, InvalidArgument):
            self.guard.failed(self.client_ip)
            log.info("AUTH failed from %s", self.client_ip)
            return AuthResult(success=False, handled=False, message=R_AUTH_INVALID)
        except MailgridError as err:
            log.warning("AUTH from %s: user store unavailable: %s", self.client_ip, err)
            return AuthResult(success=False, handled=False, message=R_AUTH_TEMPORARY)
        log.info("AUTH as %s from %s", user.address, self.client_ip)
        return AuthResult(success=True, auth_data=user, message=R_AUTH_OK)


def session_user(session: Session) -> common_pb2.User:
    user = session.auth_data
    if not isinstance(user, common_pb2.User):  # MAIL/RCPT/DATA need AUTH first
        raise PermissionDenied("not authenticated")
    return user


class SubmissionHandler(MxHandler):
    """The submission policy, as aiosmtpd handler hooks; the rest as at the MX."""

    def __init__(self, settings: Settings, metadata: MetadataClient, nc: NATS,
                 delivery: DeliveryClient) -> None:
        super().__init__(settings, metadata, nc)
        self.delivery = delivery

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        user = session_user(session)
        if address.lower() != user.address.lower():
            return R_NOT_YOUR_SENDER
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return R_BAD_ADDRESS
        # Percent hack, bang paths and quoted "@" ask to relay onwards (RFC 5321 3.6.1).
        if any(c in local for c in "%!@"):
            return R_ROUTING_DENIED
        try:
            normalized = f"{local}@{ascii_domain(domain)}"
        except InvalidArgument:
            return R_BAD_ADDRESS
        if normalized.lower() in (r.lower() for r in envelope.rcpt_tos):
            return "250 2.1.5 Ok"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return R_TOO_MANY_RCPT
        if self.settings.is_local_domain(normalized.rpartition("@")[2]):
            reply = await self._check_mailbox(normalized)
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(normalized)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        user = session_user(session)
        content = envelope.original_content or b""
        refusal = self._check_content(content)
        if refusal:
            return refusal
        froms = compose.from_addresses(content)
        if froms is not None and any(a.lower() != user.address.lower() for a in froms):
            return R_NOT_YOUR_FROM
        submission_id = new_queue_id()
        received = await self._received(server, session, envelope, submission_id)
        sent = received + with_missing_fields(content, user.address, froms is None)
        outgoing = (compose.without_fields(sent, ["bcc"]) if compose.has_field(sent, "bcc")
                    else sent)
        try:
            reply = await self._submit(session, envelope, user, submission_id, sent, outgoing)
        except (InvalidArgument, NotFound) as err:
            return f"554 5.6.0 Message refused: {err.detail}"
        except PermissionDenied as err:
            return f"553 5.7.1 {err.detail}"
        except TooLarge:
            return R_TOO_BIG
        except MailgridError as err:
            log.warning("submission %s not accepted: %s", submission_id, err)
            return temporary(err)
        except Exception:
            log.exception("submission %s not accepted", submission_id)
            return R_TEMPORARY
        log.info("submitted %s from %s rcpt=%d size=%d (sent %s)", submission_id,
                 user.address, len(envelope.rcpt_tos), len(outgoing), reply.sent_email_id)
        return f"250 2.0.0 Ok: queued as {submission_id}"

    async def _submit(self, session: Session, envelope: Envelope, user: common_pb2.User,
                      submission_id: str, sent: bytes, outgoing: bytes
                      ) -> delivery_pb2.SubmitMessageResponse:
        md = self.metadata
        if sent is outgoing:
            sent_put = out_put = await md.put_blob(outgoing)
        else:
            out_put, sent_put = await asyncio.gather(md.put_blob(outgoing), md.put_blob(sent))
        req = delivery_pb2.SubmitMessageRequest(
            submission_id=submission_id, sender_user_id=user.user_id,
            mail_from=envelope.mail_from or user.address, recipients=envelope.rcpt_tos,
            blob_key=out_put.blob_key, size=len(outgoing))
        if sent is not outgoing:
            req.sent_blob_key, req.sent_size = sent_put.blob_key, len(sent)
        return await self.delivery.submit_message(req)


def with_missing_fields(content: bytes, address: str, add_from: bool) -> bytes:
    """``content`` with the From, Date and Message-ID an MSA adds when missing
    (RFC 6409 8.1-8.3)."""
    fields: list[bytes] = []
    if add_from:
        fields.append(compose.header_line("From", address))
    if not compose.has_field(content, "date"):
        fields.append(compose.header_line("Date", format_datetime(datetime.now(UTC))))
    if not compose.has_field(content, "message-id"):
        domain = address.rpartition("@")[2]
        fields.append(compose.header_line("Message-ID", make_msgid(domain=domain)))
    return compose.with_fields(content, fields) if fields else content


class _NoLoginDataNotice(logging.Filter):
    """aiosmtpd logs a deprecation warning on every successful AUTH (it sets its own
    Session.login_data); not news to an operator, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


class SubmissionListener(MxListener):
    """Serves SubmissionSMTP on settings.submission_addr."""

    label = "SMTP submission"

    def __init__(self, settings: Settings, metadata: MetadataClient, nc: NATS,
                 delivery: DeliveryClient, tls_context: ssl.SSLContext) -> None:
        super().__init__(settings, metadata, nc)
        self.addr = settings.submission_addr
        self.handler = SubmissionHandler(settings, metadata, nc, delivery)
        self.tls_context = tls_context
        self.guard = AuthGuard(settings.submission_auth_max_failures,
                               settings.submission_auth_failure_window)

    async def start(self) -> str:
        aiosmtpd_log = logging.getLogger("mail.log")
        if not any(isinstance(f, _NoLoginDataNotice) for f in aiosmtpd_log.filters):
            aiosmtpd_log.addFilter(_NoLoginDataNotice())
        return await super().start()

    def protocol(self, loop: asyncio.AbstractEventLoop) -> MxSMTP:
        assert isinstance(self.handler, SubmissionHandler)
        return SubmissionSMTP(self.handler, self.settings, loop, self.sessions,
                              self._data_done.set, self.tls_context, self.guard)

