"""The MX listener's pure checks: hop counting, our Received header."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway import received

WHEN = datetime(2024, 5, 1, 12, 30, 0, tzinfo=UTC)


def test_received_fields_are_counted_in_the_header_block_only() -> None:
    message = (b"Received: from a\r\nRECEIVED : from b\r\nreceived:x\r\n"
               b"X-Received: not one\r\nSubject: s\r\n\r\nReceived: in the body\r\n")
    assert received.count_received(message) == 3


def test_a_message_without_headers_has_no_received_fields() -> None:
    assert received.count_received(b"\r\nReceived: body\r\n") == 0


def test_received_header_names_one_recipient_in_rfc_5321_form() -> None:
    header = received.received_header(
        helo="client.example.net", rdns="mail.example.net", ip="192.0.2.1",
        server_name="mx.example.test", protocol="ESMTP", queue_id="Q1",
        rcpt_to=["bob@example.test"], when=WHEN)
    assert header == (
        b"Received: from client.example.net (mail.example.net [192.0.2.1])\r\n"
        b"\tby mx.example.test (mailgrid) with ESMTP id Q1\r\n"
        b"\tfor <bob@example.test>; Wed, 01 May 2024 12:30:00 +0000\r\n"
    )


def test_received_header_leaves_out_several_recipients() -> None:
    header = received.received_header(
        helo="h", rdns="unknown", ip="192.0.2.1", server_name="mx.example.test",
        protocol="ESMTP", queue_id="Q2", rcpt_to=["a@example.test", "b@example.test"],
        when=WHEN)
    assert b"for" not in header
    assert header.endswith(b"id Q2;\r\n\tWed, 01 May 2024 12:30:00 +0000\r\n")


def test_a_hostile_helo_cannot_close_the_comment_or_add_a_header() -> None:
    header = received.received_header(
        helo="evil) (x\x00\r\nBcc: all", rdns="unknown", ip="192.0.2.1",
        server_name="mx.example.test", protocol="ESMTP", queue_id="Q3",
        rcpt_to=["a@example.test"], when=WHEN)
    first_line = header.split(b"\r\n")[0]
    assert first_line == b"Received: from evil???x???Bcc:?all (unknown [192.0.2.1])"
    assert header.count(b"\r\n") == 3


@pytest.mark.parametrize(("extended", "tls", "utf8", "expected"), [
    (False, False, False, "SMTP"),
    (True, False, False, "ESMTP"),
    (True, True, False, "ESMTPS"),
    (True, False, True, "UTF8SMTP"),
    (True, True, True, "UTF8SMTPS"),
])
def test_with_keyword_follows_rfc_3848(extended: bool, tls: bool, utf8: bool,
                                       expected: str) -> None:
    assert received.with_protocol(extended=extended, tls=tls, smtputf8=utf8) == expected
