"""The SMTP MX listener: mail from other servers to our users.

aiosmtpd speaks the protocol; ``MxHandler`` holds the policy (who may receive, what a
message may look like) and ``MxSMTP`` only adds what the protocol class lacks: an RFC
3463 enhanced status code on every reply, a configurable line length, source-route
refusal. A message is answered ``250`` only once its INBOUND job is acknowledged by
JetStream (stored and fsynced), the job carrying the bytes themselves or, for a large
message, naming them in the blob store where they were put first; so nothing accepted
can be lost. Jobs accepted together are published together (gateway.inbound_publisher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax
from nats.aio.client import Client as NATS

from gateway import received
from gateway.inbound_publisher import InboundPublisher
from gateway.smtp_addr import FastAddrSMTP
from gateway.smtp_data import ChunkedDataSMTP
from gateway.smtp_setup import QuickSetupSMTP
from gateway.smtp_timeout import LazyTimeoutSMTP
from mailgrid import wire
from mailgrid.clients import MetadataClient
from mailgrid.crlf import has_bare_cr_or_lf
from mailgrid.errors import MailgridError, NotFound, Unavailable
from mailgrid.grpcutil import CHUNK_SIZE
from mailgrid.ids import new_queue_id
from mailgrid.settings import Settings, split_host_port
from mailgrid.ttlcache import TtlCache
from mailgrid.usercache import UserCache
from mailgrid.v1 import delivery_pb2

log = logging.getLogger(__name__)

IDENT = "mailgrid ESMTP"
# Seconds for the reverse DNS lookup that names the client in our Received header.
RDNS_TIMEOUT = 3.0
# Seconds a client address's reverse DNS name is reused.
RDNS_TTL = 60.0
# Bytes of a job's payload kept for its other fields and the NATS headers.
INLINE_HEADROOM = 64 * 1024
# Seconds to wait for JetStream to acknowledge an INBOUND job.
PUBLISH_TIMEOUT = 5.0
NULL_SENDER = "<>"

# Replies of our own policy.
R_MAIL_OK = "250 2.1.0 Ok"
R_RCPT_OK = "250 2.1.5 Ok"
R_OK = "250 2.0.0 Ok"
R_BYE = "221 2.0.0 Bye"
R_RELAY_DENIED = "554 5.7.1 Relay access denied"
R_ROUTING_DENIED = "554 5.7.1 Source routes and %-hack or !-path addresses are not accepted"
R_BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
R_TOO_MANY_RCPT = "452 4.5.3 Too many recipients"
R_MAILBOX_FULL = "452 4.2.2 Mailbox full"
R_BARE_CR_LF = "550 5.6.0 Message contains bare CR or LF (RFC 5321 2.3.8)"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
R_LOOP = "554 5.4.6 Too many hops (mail loop)"
R_TEMPORARY = "451 4.3.0 Temporary failure, try again later"
R_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
R_TIMEOUT = "421 4.4.2 Timeout, closing connection"
R_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
R_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try later"

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_REPLY = re.compile(r"^(\d{3})([ -])(.*)$", re.DOTALL)
# Enhanced codes (RFC 3463) for the replies aiosmtpd writes itself, by reply code and
# the start of its text; the first match wins.
_AIOSMTPD_CODES: tuple[tuple[str, str, str], ...] = (
    ("552", "", "5.3.4"),                   # message (or SIZE=) too big
    ("500", "Line too long", "5.6.0"),      # a DATA line over the limit: media error
    ("500", "", "5.5.2"),                   # bad syntax, unknown command, long command
    ("501", "", "5.5.4"),                   # invalid command arguments
    ("502", "", "5.5.1"),                   # command not implemented
    ("503", "", "5.5.1"),                   # bad sequence of commands
    ("504", "", "5.5.4"),
    ("530", "", "5.7.0"),
    ("553", "", "5.1.3"),                   # malformed address
    ("554", "", "5.7.0"),
    ("555", "", "5.5.4"),                   # unknown MAIL/RCPT parameters
)


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an RFC 3463 enhanced status code after the reply code.

    RFC 2034 3: once ENHANCEDSTATUSCODES is advertised, every 2xx, 4xx and 5xx reply
    carries one, except the greeting and the replies to EHLO/HELO (callers skip those).
    """
    match = _REPLY.match(reply)
    if match is None:
        return reply
    code, sep, text = match.groups()
    if code[0] not in "245" or code == "220" or _ENHANCED.match(text):
        return reply
    enhanced = f"{code[0]}.0.0"
    for known_code, prefix, known in _AIOSMTPD_CODES:
        if code == known_code and text.startswith(prefix):
            enhanced = known
            break
    return f"{code}{sep}{enhanced} {text}"


def temporary(err: MailgridError) -> str:
    """The reply for a failure while accepting DATA: always 4xx, never a loss or a 5xx."""
    code, _ = err.smtp_reply
    if code >= 500:
        return R_TEMPORARY
    return err.smtp(f"{err.title}, try again later")


class MxSession(Session):
    """aiosmtpd's session plus the client's reverse DNS name, looked up once."""

    rdns: str | None = None


class MxSMTP(QuickSetupSMTP, LazyTimeoutSMTP, ChunkedDataSMTP, FastAddrSMTP):
    """aiosmtpd's protocol with enhanced status codes and mailgrid's limits.

    Cheap to set up per connection (gateway.smtp_setup), with one idle timer per session
    (gateway.smtp_timeout), reading DATA in large pieces with aiosmtpd's exact end-of-data
    rules (gateway.smtp_data), and plain MAIL/RCPT paths without the email header parser
    (gateway.smtp_addr).
    """

    def __init__(self, handler: MxHandler, settings: Settings,
                 loop: asyncio.AbstractEventLoop, sessions: set[MxSMTP],
                 on_data_done: Callable[[], None], **options: Any) -> None:
        # Read by SMTP.__init__ as the StreamReader limit: a line may be this long.
        self.line_length_limit = settings.max_line_length
        super().__init__(
            handler,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.server_name,
            ident=IDENT,
            timeout=settings.smtp_idle_timeout,
            loop=loop,
            **options,  # e.g. TLS and AUTH for the submission listener
        )
        self._sessions = sessions
        self._on_data_done = on_data_done
        self._greeting_reply = False
        self.in_data = False
        self._data_timeout = settings.smtp_data_timeout
        self._max_errors = settings.smtp_max_errors
        self._max_per_ip = settings.smtp_max_connections_per_ip
        self._errors = 0
        self._refused = False
        self.peer_ip = ""

    def _create_session(self) -> Session:
        return MxSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again on the TLS transport after STARTTLS: the cap counts connections.
        if self._original_transport is None:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if self._over_connection_cap():
                self._refuse(transport)
                return
        self._sessions.add(self)
        super().connection_made(transport)

    def _over_connection_cap(self) -> bool:
        same = sum(1 for s in self._sessions if s.peer_ip == self.peer_ip)
        return same >= self._max_per_ip

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """421 before the greeting (RFC 5321 3.1) and close, without a session."""
        log.warning("connection from %s refused: over %d connections",
                    self.peer_ip, self._max_per_ip)
        self._refused = True
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(R_TOO_MANY_CONNECTIONS.encode("ascii") + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._sessions.discard(self)
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: a server may close an idle session; 421 tells the client why.
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(R_TIMEOUT.encode("ascii") + b"\r\n")
        log.info("%s: timeout, closing", self.peer_ip)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not (self._greeting_reply and status[:1] == "2"):
            status_str = with_enhanced_code(status)
            await super().push(status_str)
            await self._count_error(status_str)
        else:
            await super().push(status)

    async def _count_error(self, reply: str) -> None:
        """Closes with 421 4.7.0 after too many error replies (Postfix hard_error_limit):
        a client that keeps failing is probing (harvesting addresses) or broken."""
        if reply[:1] not in "45" or reply[:3] == "421":
            return
        self._errors += 1
        if self._errors >= self._max_errors and self.transport is not None:
            log.warning("%s: %d errors, closing", self.peer_ip, self._errors)
            await super().push(R_TOO_MANY_ERRORS)
            self.transport.close()

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._greeting_reply = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting_reply = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._greeting_reply = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting_reply = False

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        # RFC 5321 4.1.1.3 says to ignore a source route and deliver to the final
        # address; aiosmtpd drops it silently. We refuse it: no relaying, however asked.
        rest = arg.strip() if arg else ""
        path = rest[3:].lstrip() if rest[:3].upper() == "TO:" else ""
        if self.envelope is not None and self.envelope.mail_from and path:
            if path.startswith("<@"):
                await self.push(R_ROUTING_DENIED)
                return
            # aiosmtpd's parser forgives "<a@b" without its ">"; RFC 5321 4.1.2 doesn't.
            if path.startswith("<") != (">" in path):
                await self.push(R_BAD_ADDRESS)
                return
        await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        # One deadline for the whole transfer: aiosmtpd resets its timer per command
        # only, and a client trickling bytes must not hold a session forever.
        self._reset_timeout(self._data_timeout)
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False
            self._on_data_done()
            if self.transport is not None:
                self._reset_timeout()

    def shut_down(self) -> None:
        """Says 421 and closes (RFC 5321 3.8); used for idle sessions at stop."""
        if self.transport is None:
            return
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(R_SHUTDOWN.encode("ascii") + b"\r\n")
        self.transport.close()


class MxHandler:
    """The MX policy, as aiosmtpd handler hooks (``handle_<VERB>``)."""

    def __init__(self, settings: Settings, metadata: MetadataClient, nc: NATS) -> None:
        self.settings = settings
        self.metadata = metadata
        self.users = UserCache(metadata)
        self.nc = nc
        # Jobs accepted together are made durable together (group commit).
        self.publisher = InboundPublisher(nc.jetstream(), PUBLISH_TIMEOUT)
        # Reverse DNS names by client address: a sending server opens many connections
        # in a row, and the lookup (a thread hop, maybe a DNS query) is per connection.
        self.rdns: TtlCache[str, str] = TtlCache(RDNS_TTL)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd ends the list with "250 HELP"; our extensions go before it.
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # aiosmtpd has checked the syntax and SIZE= (552 5.3.4 when over the limit).
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return R_MAIL_OK

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply, normalized = self._check_address(address)
        if normalized is None:
            return reply
        if normalized.lower() in (r.lower() for r in envelope.rcpt_tos):
            return R_RCPT_OK  # the same recipient twice still gets one copy
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return R_TOO_MANY_RCPT
        reply = await self._check_mailbox(normalized)
        if reply == R_RCPT_OK:
            envelope.rcpt_tos.append(normalized)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    def _check_address(self, address: str) -> tuple[str, str | None]:
        """(reply, address with its domain lower-cased) or (refusal, None)."""
        local, at, domain = address.rpartition("@")
        if not at:
            # RFC 5321 4.5.1: <postmaster> without a domain must be accepted.
            if address.lower() == "postmaster":
                return R_RCPT_OK, f"postmaster@{self.settings.domains[0]}"
            return R_BAD_ADDRESS, None
        if not local or not domain:
            return R_BAD_ADDRESS, None
        # Percent hack, bang paths and quoted "@" ask us to relay onwards (RFC 5321 3.6.1).
        if any(c in local for c in "%!@"):
            return R_ROUTING_DENIED, None
        if not self.settings.is_local_domain(domain):
            return R_RELAY_DENIED, None
        return R_RCPT_OK, f"{local}@{domain.lower().rstrip('.')}"

    async def _check_mailbox(self, address: str) -> str:
        try:
            user = await self.users.by_address(address)
        except NotFound:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        except MailgridError as err:
            log.warning("RCPT %s: metadata lookup failed: %s", address, err)
            return temporary(err)
        except Exception:
            log.exception("RCPT %s: metadata lookup failed", address)
            return R_TEMPORARY
        if 0 < user.quota_bytes <= user.used_bytes:
            return R_MAILBOX_FULL
        return R_RCPT_OK

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return R_OK

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return R_OK

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return R_BYE

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error", exc_info=error)
        return R_TEMPORARY

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        refusal = self._check_content(content)
        if refusal:
            return refusal
        queue_id = new_queue_id()
        header = await self._received(server, session, envelope, queue_id)
        size = len(header) + len(content)
        try:
            if size <= self._inline_max():
                # Small enough to travel in the job: one durable publish and no blob
                # round trip; the inbound worker stores the bytes with the mailbox write.
                await self._publish(session, envelope, queue_id, "", size, header, content)
            else:
                put = await self.metadata.put_blob(_chunks(header, content))
                await self._publish(session, envelope, queue_id, put.blob_key, size)
        except MailgridError as err:
            log.warning("DATA %s not accepted: %s", queue_id, err)
            return temporary(err)
        except Exception:
            log.exception("DATA %s not accepted", queue_id)
            return R_TEMPORARY
        log.info("queued %s from=<%s> rcpt=%d size=%d", queue_id,
                 _reverse_path(envelope), len(envelope.rcpt_tos), len(content))
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _check_content(self, content: bytes) -> str | None:
        if has_bare_cr_or_lf(content):
            return R_BARE_CR_LF
        if len(content) > self.settings.max_message_size:
            return R_TOO_BIG
        if received.count_received(content) > self.settings.max_received_headers:
            return R_LOOP
        return None

    async def _received(self, server: SMTP, session: Session, envelope: Envelope,
                        queue_id: str) -> bytes:
        ip = _peer_ip(session)
        return received.received_header(
            helo=session.host_name or "",
            rdns=await _reverse_dns(session, ip, self.rdns),
            ip=ip,
            server_name=self.settings.server_name,
            protocol=received.with_protocol(extended=session.extended_smtp,
                                            tls=session.ssl is not None,
                                            smtputf8=envelope.smtp_utf8,
                                            authenticated=session.authenticated is True),
            queue_id=queue_id,
            rcpt_to=envelope.rcpt_tos,
        )

    def _inline_max(self) -> int:
        """Largest message that travels inside its job: the setting, and always well
        under the payload limit the NATS server announced."""
        return min(self.settings.inbound_inline_max_bytes,
                   self.nc.max_payload - INLINE_HEADROOM)

    async def _publish(self, session: Session, envelope: Envelope, queue_id: str,
                       blob_key: str, size: int, *raw: bytes) -> None:
        """Publishes the job; ``raw`` is the message's bytes when they travel in it."""
        if not self.nc.is_connected:
            # Fail at once rather than buffer a job that nobody acknowledges.
            raise Unavailable("not connected to NATS")
        job = delivery_pb2.InboundJob(
            queue_id=queue_id, blob_key=blob_key, size=size,
            mail_from=_reverse_path(envelope), rcpt_to=envelope.rcpt_tos,
            client_address=_peer_ip(session), helo=session.host_name or "",
        )
        job.received_at.FromDatetime(datetime.now(UTC))
        await self.publisher.publish(queue_id, wire.with_bytes_field(
            job.SerializeToString(), delivery_pb2.InboundJob.RAW_FIELD_NUMBER, *raw))


def _chunks(header: bytes, content: bytes) -> Iterator[bytes]:
    """The message to store, as gRPC-sized chunks, without copying it whole."""
    yield header
    view = memoryview(content)
    for start in range(0, len(view), CHUNK_SIZE):
        yield bytes(view[start:start + CHUNK_SIZE])


def _reverse_path(envelope: Envelope) -> str:
    sender = envelope.mail_from or ""
    return "" if sender == NULL_SENDER else sender


def _peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


async def _reverse_dns(session: Session, ip: str,
                       cache: TtlCache[str, str] | None = None) -> str:
    if isinstance(session, MxSession) and session.rdns is not None:
        return session.rdns
    cached = cache.get(ip) if cache is not None else None
    if cached is not None:
        name = cached
    else:
        try:
            name, _ = await asyncio.wait_for(
                asyncio.get_running_loop().getnameinfo((ip, 0), socket.NI_NAMEREQD),
                RDNS_TIMEOUT)
        except (OSError, TimeoutError, UnicodeError):
            name = "unknown"
        if cache is not None:
            cache.put(ip, name)
    if isinstance(session, MxSession):
        session.rdns = name
    return name


class MxListener:
    """Serves MxSMTP on the service's own event loop; ``stop`` lets DATA finish first.

    Subclasses serve another protocol class on another address (gateway.submission).
    """

    label = "SMTP MX"

    def __init__(self, settings: Settings, metadata: MetadataClient, nc: NATS) -> None:
        self.settings = settings
        self.addr = settings.smtp_addr
        self.handler: MxHandler = MxHandler(settings, metadata, nc)
        self.sessions: set[MxSMTP] = set()
        self._server: asyncio.Server | None = None
        self._data_done = asyncio.Event()
        self.bound_addr = ""

    def protocol(self, loop: asyncio.AbstractEventLoop) -> MxSMTP:
        """One connection's protocol instance."""
        return MxSMTP(self.handler, self.settings, loop, self.sessions, self._data_done.set)

    async def start(self) -> str:
        host, port = split_host_port(self.addr)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: self.protocol(loop), host, port)
        sockname = self._server.sockets[0].getsockname()
        bound_host = f"[{host}]" if ":" in host else host
        self.bound_addr = f"{bound_host}:{sockname[1]}"
        log.info("%s listening on %s", self.label, self.bound_addr)
        return self.bound_addr

    async def stop(self, grace: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.close()  # no new connections
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(s.in_data for s in self.sessions) and loop.time() < deadline:
            self._data_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._data_done.wait(), deadline - loop.time())
        for session in list(self.sessions):
            session.shut_down()
        await self._server.wait_closed()
        self._server = None
