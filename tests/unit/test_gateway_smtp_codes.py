"""Enhanced status codes (RFC 3463) added to aiosmtpd's own replies."""

from __future__ import annotations

import pytest

from gateway.smtp import temporary, with_enhanced_code
from mailgrid.errors import InvalidArgument, StorageFull, Unavailable


@pytest.mark.parametrize(("reply", "expected"), [
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ('500 Error: command "FOO" not recognized', '500 5.5.2 Error: command "FOO" not recognized'),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ("500 Line too long (see RFC5321 4.5.3.1.6)",
     "500 5.6.0 Line too long (see RFC5321 4.5.3.1.6)"),
    ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
    ("552 Error: message size exceeds fixed maximum message size",
     "552 5.3.4 Error: message size exceeds fixed maximum message size"),
    ("555 MAIL FROM parameters not recognized or not implemented",
     "555 5.5.4 MAIL FROM parameters not recognized or not implemented"),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("451 something", "451 4.0.0 something"),
])
def test_aiosmtpd_replies_get_an_enhanced_code(reply: str, expected: str) -> None:
    assert with_enhanced_code(reply) == expected


@pytest.mark.parametrize("reply", [
    "250 2.1.5 Ok",
    "553 5.1.3 Error: malformed address",
    "220 mx.example.test mailgrid ESMTP",
    "354 End data with <CR><LF>.<CR><LF>",
    "not a reply",
])
def test_replies_with_a_code_the_greeting_and_354_stay_as_they_are(reply: str) -> None:
    assert with_enhanced_code(reply) == reply


def test_failures_while_accepting_data_are_always_temporary() -> None:
    assert temporary(Unavailable("nats down")).startswith("451 4.3.0 ")
    assert temporary(StorageFull("disk")).startswith("452 4.3.1 ")
    assert temporary(InvalidArgument("odd")).startswith("451 4.3.0 ")
