"""What the MX listener checks in and adds to a message's bytes, without any I/O.

Kept apart from the SMTP wiring so each rule is a small pure function with its own tests.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

CRLF = b"\r\n"
# A header line that opens a Received field (RFC 5322 3.6.7: field names are case-insensitive).
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
# What may stand in a Received clause we write: printable ASCII without the comment
# delimiters, so a client's HELO cannot close our comment or inject a header.
_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x7e]")


def header_block(data: bytes) -> bytes:
    """The header section: everything before the first empty line (RFC 5322 2.1)."""
    if data.startswith(CRLF):
        return b""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 2]


def count_received(data: bytes) -> int:
    """How many Received fields the header section holds (RFC 5321 6.3 loop detection)."""
    return len(_RECEIVED.findall(header_block(data)))


def clean(text: str, fallback: str = "unknown") -> str:
    """``text`` made safe for a Received clause (client-supplied names are untrusted)."""
    safe = _UNSAFE.sub("?", text)[:255]
    return safe or fallback


def received_header(*, helo: str, rdns: str, ip: str, server_name: str, protocol: str,
                    queue_id: str, rcpt_to: list[str], when: datetime | None = None) -> bytes:
    """Our trace field, in the form of RFC 5321 4.4, folded, ending in CRLF.

    ``protocol`` is a WITH keyword registered by RFC 3848 (SMTP, ESMTP, ESMTPS, ...).
    The FOR clause names the recipient only when there is one: listing several would
    disclose Bcc recipients to each other.
    """
    moment = when or datetime.now(UTC)
    lines = [
        f"Received: from {clean(helo)} ({clean(rdns)} [{clean(ip)}])",
        f"\tby {clean(server_name)} (mailgrid) with {protocol} id {queue_id}",
    ]
    date = format_datetime(moment)
    if len(rcpt_to) == 1:
        lines.append(f"\tfor <{clean(rcpt_to[0])}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def with_protocol(*, extended: bool, tls: bool, smtputf8: bool,
                  authenticated: bool = False) -> str:
    """The WITH keyword for a transaction (RFC 3848; UTF8 variants from RFC 6531).

    "S" marks TLS and "A" an authenticated client (AUTH, as on the submission port).
    """
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")
