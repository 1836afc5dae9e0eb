"""Delivery status notifications (RFC 3464) for the sender of a message we could not deliver.

A multipart/report (RFC 6522) of three parts: a note for people, the machine-readable
message/delivery-status, and the original message's headers as text/rfc822-headers. It
comes from the null sender and says so (RFC 3834 Auto-Submitted), so no DSN is ever
sent about it. Built by hand, line by line, so every line ends in CRLF.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from delivery_svc.smtp_out import RcptResult, one_line

CRLF = b"\r\n"


@dataclass(frozen=True)
class Report:
    """What a DSN says: about which message, and what happened to which recipients."""

    reporting_mta: str
    postmaster_domain: str
    sender: str
    job_id: str
    arrival: datetime
    results: Sequence[RcptResult]
    # The original message (only its header block is included); None if it is gone.
    original: bytes | None
    # "failed" (returned) or "delayed" (still being tried until will_retry_until).
    action: str = "failed"
    will_retry_until: datetime | None = None


def header_block(message: bytes) -> bytes:
    """The header section of a message, without the blank line that ends it."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def original_message_id(message: bytes | None) -> str:
    if not message:
        return ""
    for line in header_block(message).split(CRLF):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"message-id":
            text = value.decode("ascii", "replace").strip()
            return one_line(text) if text.startswith("<") and text.endswith(">") else ""
    return ""


def build_dsn(report: Report, now: datetime | None = None) -> bytes:
    """The DSN as raw bytes (CRLF line endings)."""
    now = now or datetime.now(UTC)
    failed = report.action == "failed"
    boundary = f"mailgrid-dsn-{secrets.token_hex(12)}"
    digest = hashlib.sha256(f"{report.job_id}:{report.action}".encode()).hexdigest()[:24]
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{report.postmaster_domain}>",
        f"To: <{one_line(report.sender)}>",
        "Subject: " + ("Undelivered Mail Returned to Sender" if failed
                       else "Delayed Mail (still being retried)"),
        f"Date: {format_datetime(now)}",
        f"Message-ID: <dsn.{digest}@{report.reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"',
    ]
    original_id = original_message_id(report.original)
    if original_id:  # files the DSN in the original's thread
        headers += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    lines = [*headers, "",
             "This is a MIME-encapsulated message.", "",
             f"--{boundary}",
             "Content-Type: text/plain; charset=us-ascii",
             "Content-Description: Notification", "",
             *_human_part(report), "",
             f"--{boundary}",
             "Content-Type: message/delivery-status",
             "Content-Description: Delivery report", "",
             *_status_part(report, now),
             f"--{boundary}",
             "Content-Type: text/rfc822-headers",
             "Content-Description: " + ("Undelivered" if failed else "Delayed")
             + " Message Headers"]
    head = CRLF.join(line.encode("ascii") for line in lines) + CRLF
    original = header_block(report.original) if report.original else b""
    if not original.isascii():
        head = head + b"Content-Transfer-Encoding: 8bit\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return head + CRLF + (original or b"(the original message is no longer available)\r\n"
                          ) + tail


def _human_part(report: Report) -> list[str]:
    if report.action == "failed":
        intro = ["This is the mail system at host " + report.reporting_mta + ".", "",
                 "I'm sorry to have to inform you that your message could not",
                 "be delivered to one or more recipients. The reasons are below.", ""]
    else:
        until = format_datetime(report.will_retry_until) if report.will_retry_until else ""
        intro = ["This is the mail system at host " + report.reporting_mta + ".", "",
                 "Your message could not be delivered yet to the recipients below.",
                 f"It will be tried again until {until}; you need not resend it.", ""]
    return intro + [f"<{one_line(r.rcpt)}>: {r.diagnostic}" for r in report.results]


def _status_part(report: Report, now: datetime) -> list[str]:
    """RFC 3464 2.2 per-message fields, then 2.3 per-recipient fields, blank-separated."""
    lines = [f"Reporting-MTA: dns; {report.reporting_mta}",
             f"X-Mailgrid-Job-ID: {one_line(report.job_id)}",
             f"Arrival-Date: {format_datetime(report.arrival)}", ""]
    for result in report.results:
        lines += [f"Final-Recipient: rfc822; {one_line(result.rcpt)}",
                  f"Action: {report.action}",
                  f"Status: {result.status}"]
        if result.remote_mta:
            lines.append(f"Remote-MTA: dns; {one_line(result.remote_mta)}")
        kind = "smtp" if result.smtp_reply else "X-Mailgrid"
        lines.append(f"Diagnostic-Code: {kind}; {result.diagnostic}")
        lines.append(f"Last-Attempt-Date: {format_datetime(now)}")
        if report.will_retry_until is not None and report.action == "delayed":
            lines.append(f"Will-Retry-Until: {format_datetime(report.will_retry_until)}")
        lines.append("")
    return lines
