"""Property-based fuzzing (Hypothesis) of the two parsers that read strangers' input:
mailgrid.mime.parse_message (any bytes from SMTP) and search_svc.query.parse (any text
typed into a search box). Bounded in time: a fixed number of examples, no deadline
flakiness (``deadline=None``), derandomised so that CI runs are reproducible.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgrid.mime import MAX_SUBJECT_CHARS, PREVIEW_CHARS, parse_message
from search_svc.query import MAX_QUERY_LENGTH, QuerySyntaxError, parse

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
MAX_PARTS = 50
MAX_BODY = 4096
NOW = datetime(2026, 1, 1, tzinfo=UTC)

# Pieces of MIME that the parser must take apart: shuffled and repeated they make
# nested multiparts, broken boundaries, bad encodings and charsets, huge parameters.
MIME_PIECES = [
    b"--b\r\n", b"--b--\r\n", b"--c\r\n", b"\r\n", b"\n", b"\r",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: multipart/alternative; boundary=\"c\"\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Type: text/html; charset=x-unknown\r\n",
    b"Content-Type: text/plain; charset=utf-7\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%ff; filename*1=x\r\n",
    b"Content-Disposition: inline; filename=\"../../etc/passwd\"\r\n",
    b"Subject: =?utf-8?b?////?= =?iso-8859-1?q?=E9?=\r\n", b"From: \"\xff\" <a@b>, ;;\r\n",
    b"To: undisclosed-recipients:;\r\n", b"Date: Mon, 32 Foo 99999 25:61 +9999\r\n",
    b"Message-ID: <<<a@b>>>\r\n", b"References: <a> <b\r\n",
    b"SGVsbG8gd29ybGQ=\r\n", b"=E9=\r\n", b"<script>alert(1)</script>\r\n",
    b"\x00\xff\xfe", b"body text\r\n", b" folded continuation\r\n",
]


@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes_parse_without_falling_back_and_within_limits(raw: bytes) -> None:
    assert_parses_within_limits(raw)


@FUZZ
@given(st.lists(st.sampled_from(MIME_PIECES), max_size=80))
def test_mime_shaped_input_parses_without_falling_back_and_within_limits(
        pieces: list[bytes]) -> None:
    assert_parses_within_limits(b"".join(pieces))


def assert_parses_within_limits(raw: bytes) -> None:
    parsed = parse_message(raw, max_depth=8, max_parts=MAX_PARTS, max_body_bytes=MAX_BODY)
    message = parsed.message
    # The catch-all fallback means an internal bug was hit: it must never be needed.
    assert not any(p.startswith("message could not be parsed")
                   for p in message.parse_problems), list(message.parse_problems)
    assert len(message.text.encode()) <= MAX_BODY + 4
    assert len(message.html.encode()) <= MAX_BODY + 4
    assert len(message.subject) <= MAX_SUBJECT_CHARS
    assert len(message.preview) <= PREVIEW_CHARS + 1
    assert len(message.attachments) <= MAX_PARTS
    assert len(parsed.attachment_data) == len(message.attachments)
    assert sum(len(d) for d in parsed.attachment_data) <= 2 * len(raw) + 16
    message.SerializeToString()


QUERY_PIECES = [
    "from:", "to:", "subject:", "has:attachment", "has:", "is:unread", "is:", "in:inbox",
    "in:", "before:2024-01-01", "after:2024/13/40", "older_than:3d", "newer_than:99999999y",
    "larger:10M", "smaller:", "OR", "AND", "-", "(", ")", "\"", "\"quoted words\"", " ",
    "word", "\u202e", "\x00", "é", "*", ":", "from:(a OR b)", "-(", "((((((((", "))",
]


@FUZZ
@given(st.text(max_size=300))
def test_any_text_query_parses_or_raises_only_its_syntax_error(query: str) -> None:
    assert_query_parses_or_points_inside(query)


@FUZZ
@given(st.lists(st.sampled_from(QUERY_PIECES), max_size=60))
def test_operator_shaped_queries_parse_or_raise_only_their_syntax_error(
        pieces: list[str]) -> None:
    assert_query_parses_or_points_inside("".join(pieces))


def assert_query_parses_or_points_inside(query: str) -> None:
    try:
        parse(query, now=NOW)
    except QuerySyntaxError as err:
        # The position points into the query (or just past its end), in code points.
        assert 0 <= err.position <= min(len(query), MAX_QUERY_LENGTH), (query, err)
        assert err.message


def test_a_query_over_the_length_limit_is_a_syntax_error() -> None:
    try:
        parse("a" * (MAX_QUERY_LENGTH + 1), now=NOW)
    except QuerySyntaxError as err:
        assert err.position == MAX_QUERY_LENGTH
    else:
        raise AssertionError("an over-long query was accepted")
