"""One SMTP delivery attempt: the targets in order, one transaction, a result per recipient.

Replies are classified as RFC 5321 4.2.1 says: 2yz done, 4yz try again later, 5yz never.
A target that cannot be reached, or greets with an error, or fails TLS, is skipped for the
next one; once a transaction has begun its replies are final for this attempt.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
from dataclasses import dataclass
from enum import Enum

import aiosmtplib
from aiosmtplib import SMTPResponse

from delivery_svc.routing import Target
from mailgrid.crlf import has_bare_cr_or_lf
from mailgrid.settings import Settings

log = logging.getLogger(__name__)

ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class Outcome(Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class RcptResult:
    rcpt: str
    outcome: Outcome
    # RFC 3463 status, e.g. 5.1.1, and the remote reply or our reason (one line).
    status: str
    diagnostic: str
    # Whose reply it is ("" when no server answered).
    remote_mta: str = ""
    # True when the diagnostic is an SMTP reply (DSN: Diagnostic-Code: smtp; ...).
    smtp_reply: bool = False


class HostFailed(Exception):
    """This target could not take the message; the next one may."""


def one_line(text: str, limit: int = 400) -> str:
    """A reply made safe for a header or a log line: printable ASCII on one line."""
    flat = " ".join(text.split())
    return "".join(ch if " " <= ch <= "~" else "?" for ch in flat)[:limit]


def reply_text(code: int, message: str) -> str:
    return one_line(f"{code} {message}")


def status_of(code: int, message: str) -> str:
    """The enhanced status in a reply, or one derived from its code (RFC 3463)."""
    match = ENHANCED.match(message.strip())
    if match and match.group(1) == str(code)[0]:
        return ".".join(match.groups())
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def classify(rcpts: list[str], code: int, message: str, mta: str) -> list[RcptResult]:
    outcome = (Outcome.DELIVERED if 200 <= code < 300 else
               Outcome.FAILED if 500 <= code < 600 else Outcome.DEFERRED)
    return [RcptResult(r, outcome, status_of(code, message), reply_text(code, message),
                       mta, smtp_reply=True) for r in rcpts]


def defer_all(rcpts: list[str], status: str, reason: str, mta: str = "") -> list[RcptResult]:
    return [RcptResult(r, Outcome.DEFERRED, status, one_line(reason), mta) for r in rcpts]


def fail_all(rcpts: list[str], status: str, reason: str, mta: str = "") -> list[RcptResult]:
    return [RcptResult(r, Outcome.FAILED, status, one_line(reason), mta) for r in rcpts]


class SmtpSender:
    """Delivers one message to one domain's recipients over SMTP."""

    def __init__(self, settings: Settings) -> None:
        self.helo_name = settings.server_name
        self.policy = settings.outbound_tls
        self.connect_timeout = settings.outbound_connect_timeout
        self.command_timeout = settings.outbound_command_timeout

    async def send(self, targets: list[Target], mail_from: str, rcpts: list[str],
                   data: bytes) -> list[RcptResult]:
        if has_bare_cr_or_lf(data):
            # We never write one (no SMTP smuggling); the message is broken, not the peer.
            return fail_all(rcpts, "5.6.0", "the message has a bare CR or LF "
                            "(RFC 5321 2.3.8); not sent")
        last_error = "no mail exchanger to try"
        for target in targets:
            try:
                return await self._send_to(target, mail_from, rcpts, data, tls=True)
            except HostFailed as err:
                last_error = str(err)
                log.info("delivery to %s [%s]:%d failed: %s", target.name, target.address,
                         target.port, err)
        return defer_all(rcpts, "4.4.1", last_error)

    async def _send_to(self, target: Target, mail_from: str, rcpts: list[str], data: bytes,
                       tls: bool) -> list[RcptResult]:
        client = aiosmtplib.SMTP(hostname=target.address, port=target.port,
                                 local_hostname=self.helo_name,
                                 timeout=self.command_timeout, start_tls=False)
        where = f"{target.name}[{target.address}]:{target.port}"
        try:
            await client.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as err:
            raise HostFailed(f"{where} greeted with {reply_text(err.code, err.message)}"
                             ) from None
        except (aiosmtplib.SMTPException, OSError) as err:
            raise HostFailed(f"cannot connect to {where}: {err}") from None
        try:
            try:
                await self._hello(client, where, tls)
            except _TlsFailed as err:
                if self.policy == "may" and tls:
                    # Opportunistic TLS that fails is retried in clear, as Postfix does.
                    log.info("%s: %s; retrying without TLS", where, err)
                    client.close()
                    return await self._send_to(target, mail_from, rcpts, data, tls=False)
                raise HostFailed(str(err)) from None
            return await self._transaction(client, target.name, mail_from, rcpts, data)
        finally:
            client.close()

    async def _hello(self, client: aiosmtplib.SMTP, where: str, tls: bool) -> None:
        await self._ehlo(client, where)
        offered = client.supports_extension("starttls")
        if self.policy == "none" or (not offered and self.policy == "may") or not tls:
            return
        if not offered:
            raise HostFailed(f"{where} does not offer STARTTLS (TLS is required)")
        context = self._tls_context()
        try:
            await client.starttls(server_hostname=client.hostname, tls_context=context)
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as err:
            raise _TlsFailed(f"STARTTLS with {where} failed: {err}") from None
        await self._ehlo(client, where)  # RFC 3207 4.2: forget what was said before TLS

    async def _ehlo(self, client: aiosmtplib.SMTP, where: str) -> None:
        try:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # RFC 5321 3.2: an old server without EHLO
        except aiosmtplib.SMTPResponseException as err:
            raise HostFailed(f"{where} refused HELO: {reply_text(err.code, err.message)}"
                             ) from None
        except (aiosmtplib.SMTPException, OSError) as err:
            raise HostFailed(f"{where} dropped the connection at EHLO: {err}") from None

    def _tls_context(self) -> ssl.SSLContext:
        if self.policy == "verify":
            return ssl.create_default_context()
        # Opportunistic (RFC 7435): encrypt, without authenticating the peer.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    async def _transaction(self, client: aiosmtplib.SMTP, mta: str, mail_from: str,
                           rcpts: list[str], data: bytes) -> list[RcptResult]:
        options: list[str] = []
        size = client.esmtp_extensions.get("size", "")
        if size.isdigit() and 0 < int(size) < len(data):
            return fail_all(rcpts, "5.3.4", f"message of {len(data)} bytes exceeds the "
                            f"{size} bytes {mta} accepts", mta)
        if "size" in client.esmtp_extensions:
            options.append(f"SIZE={len(data)}")
        encoding = "ascii"
        if not all(addr.isascii() for addr in [mail_from, *rcpts]):
            if not client.supports_extension("smtputf8"):
                return fail_all(rcpts, "5.6.7", f"{mta} does not support SMTPUTF8 for a "
                                "non-ASCII address (RFC 6531)", mta)
            options.append("SMTPUTF8")
            encoding = "utf-8"
        try:
            return await self._mail_rcpt_data(client, mta, mail_from, rcpts, data, options,
                                              encoding)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                OSError) as err:
            return defer_all(rcpts, "4.4.2", f"connection with {mta} lost: {err}", mta)

    async def _mail_rcpt_data(self, client: aiosmtplib.SMTP, mta: str, mail_from: str,
                              rcpts: list[str], data: bytes, options: list[str],
                              encoding: str) -> list[RcptResult]:
        try:
            await client.mail(mail_from, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as err:
            return classify(rcpts, err.code, err.message, mta)
        results: dict[str, RcptResult] = {}
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt, encoding=encoding)
            except aiosmtplib.SMTPResponseException as err:
                results[rcpt] = classify([rcpt], err.code, err.message, mta)[0]
            else:
                accepted.append(rcpt)
        if accepted:
            try:
                reply: SMTPResponse = await client.data(data)
            except aiosmtplib.SMTPResponseException as err:
                code, message = err.code, err.message
            else:
                code, message = reply.code, reply.message
            for result in classify(accepted, code, message, mta):
                results[result.rcpt] = result
        if client.is_connected:
            # The transaction is over; a lost QUIT changes nothing.
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
        return [results[r] for r in rcpts]


class _TlsFailed(Exception):
    """The TLS handshake failed (opportunistic TLS may retry in clear)."""
