"""mailgrid.mime: what a parse reads, and that no input bytes make it raise."""

from __future__ import annotations

import base64
import email.policy
import itertools
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailgrid.mime import (
    ParsedEmail,
    html_to_text,
    make_preview,
    parse_message,
    single_part,
    split_mbox,
)
from tests.conftest import CORPUS
from tests.e2e.mail import smtp_wire_form
from tests.e2e.test_corpus import corpus_messages

CRLF = b"\r\n"


def _parse(raw: bytes, **limits: int) -> ParsedEmail:
    parsed = parse_message(raw, max_depth=limits.get("max_depth", 50),
                           max_parts=limits.get("max_parts", 1000),
                           max_body_bytes=limits.get("max_body_bytes", 1024 * 1024))
    # The last-resort guard in parse_message catches bugs; no input may reach it.
    assert not any(p.startswith("message could not be parsed")
                   for p in parsed.message.parse_problems)
    return parsed


def _msg(*lines: str, body: str = "hello") -> bytes:
    return CRLF.join(line.encode() for line in lines) + CRLF + CRLF + body.encode()


def _manifest() -> dict[str, dict[str, str]]:
    lines = (CORPUS / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return {row[0]: dict(zip(header, row, strict=False))
            for row in (line.split("\t") for line in lines[1:])}


def _corpus_messages() -> Iterator[tuple[str, bytes]]:
    manifest = _manifest()
    for path in sorted(CORPUS.rglob("*")):
        rel = str(path.relative_to(CORPUS))
        if not path.is_file() or rel not in manifest:
            continue
        data = path.read_bytes()
        if manifest[rel]["kind"] == "mbox":
            for index, message in enumerate(split_mbox(data)):
                yield f"{rel}#{index}", message
        else:
            yield rel, data


# extraction


def test_subject_with_rfc2047_encoded_words_is_decoded() -> None:
    raw = _msg("Subject: =?UTF-8?B?SGVsbG8gd8O2cmxk?= and =?ISO-8859-1?Q?caf=E9?=",
               "From: a@example.org", "Date: Tue, 10 May 2005 11:26:39 -0600")
    assert _parse(raw).message.subject == "Hello wörld and café"


def test_multipart_alternative_gives_text_and_html_bodies_and_no_attachment() -> None:
    raw = _msg(
        "From: Alice <alice@example.org>", "Subject: alt",
        "Date: Tue, 10 May 2005 11:26:39 -0600",
        "MIME-Version: 1.0", 'Content-Type: multipart/alternative; boundary="b1"',
        body=("--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain bödy\r\n"
              "--b1\r\nContent-Type: text/html; charset=utf-8\r\n"
              "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
              "<html><head><style>p{}</style></head><body><p>html =C3=B6</p></body></html>\r\n"
              "--b1--\r\n"))
    parsed = _parse(raw).message
    assert parsed.text.strip() == "plain bödy"
    assert "<p>html ö</p>" in parsed.html
    assert parsed.preview == "plain bödy"
    assert list(parsed.attachments) == []


def test_preview_comes_from_html_when_there_is_no_text_part() -> None:
    raw = _msg("From: a@example.org", "Content-Type: text/html; charset=utf-8",
               body="<html><head><title>T</title><script>x()</script></head>"
                    "<body><p>Hello</p>\n\n<p>  there &amp; you</p></body></html>")
    parsed = _parse(raw).message
    assert parsed.text == ""
    assert parsed.preview == "Hello there & you"


def test_preview_is_about_200_characters_of_collapsed_whitespace() -> None:
    preview = make_preview("word   \r\n\t " * 200)
    assert len(preview) <= 200
    assert "  " not in preview
    assert preview.startswith("word word")


_WHITESPACE = [chr(c) for c in range(0x3001) if chr(c).isspace()]


def _regex_preview(text: str) -> str:
    expected = re.sub(r"\s+", " ", text[:4000]).strip()
    return expected if len(expected) <= 200 else expected[:199].rstrip() + "…"


@pytest.mark.parametrize("text", [
    "x" * 399 + " " + "y" * 50,          # a word across the end of the first window
    " " * 390 + "short",                 # whitespace first: the longer window decides
    "\n" * 500 + "word " * 100,
    "w " * 100,                          # collapses to exactly 199 characters
    "w " * 101,
    "ab" * 300,                          # one word longer than both windows' start
])
def test_preview_windows_agree_with_the_regex_at_their_edges(text: str) -> None:
    assert make_preview(text) == _regex_preview(text)


@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from(_WHITESPACE)), max_size=80))
@settings(max_examples=300, deadline=None)
def test_preview_collapses_whitespace_exactly_as_the_regex_did(pieces: list[str]) -> None:
    assert make_preview("".join(pieces)) == _regex_preview("".join(pieces))


def test_html_to_text_skips_scripts_and_styles() -> None:
    assert html_to_text("<style>a{}</style><b>bold</b><script>evil()</script>") == "bold"


def test_attachment_with_rfc2231_filename_is_decoded_with_its_bytes() -> None:
    payload = bytes(range(256)) * 10
    encoded = base64.encodebytes(payload).decode()
    raw = _msg(
        "From: a@example.org", "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="xx"',
        body=("--xx\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
              "--xx\r\nContent-Type: application/octet-stream\r\n"
              "Content-Transfer-Encoding: base64\r\n"
              "Content-ID: <part1@example.org>\r\n"
              "Content-Disposition: attachment;\r\n"
              " filename*0*=UTF-8''%C3%BCber%20den;\r\n"
              " filename*1*=%20Wolken.bin\r\n\r\n"
              f"{encoded}\r\n--xx--\r\n"))
    parsed = _parse(raw)
    (att,) = parsed.message.attachments
    assert att.filename == "über den Wolken.bin"
    assert att.content_type == "application/octet-stream"
    assert att.size == len(payload)
    assert att.content_id == "part1@example.org"
    assert not att.inline
    assert att.blob_key == ""  # the worker fills it after storing the bytes
    assert parsed.attachment_data == [payload]
    assert parsed.message.text.strip() == "see attached"


def test_rfc2047_filename_in_a_quoted_parameter_is_decoded() -> None:
    raw = _msg(
        "From: a@example.org", 'Content-Type: multipart/mixed; boundary="q"',
        body=("--q\r\nContent-Type: image/png\r\nContent-Disposition: inline;"
              ' filename="=?UTF-8?Q?gr=C3=BC=C3=9Fe.png?="\r\n\r\nPNG\r\n--q--\r\n'))
    (att,) = _parse(raw).message.attachments
    assert att.filename == "grüße.png"
    assert att.inline


def test_filename_cannot_name_a_directory() -> None:
    raw = _msg("From: a@example.org", "Content-Type: application/pdf",
               'Content-Disposition: attachment; filename="../../etc/passwd"', body="x")
    (att,) = _parse(raw).message.attachments
    assert att.filename == "passwd"


def test_message_id_in_reply_to_and_references_lose_their_angle_brackets() -> None:
    raw = _msg("From: a@example.org", "Message-ID: <abc.123@example.org>",
               "In-Reply-To: <parent@example.org> (comment)",
               "References: <root@example.org>\r\n <mid@example.org>  <parent@example.org>")
    parsed = _parse(raw).message
    assert parsed.message_id == "abc.123@example.org"
    assert parsed.in_reply_to == "parent@example.org"
    assert list(parsed.references) == ["root@example.org", "mid@example.org",
                                       "parent@example.org"]


def test_address_lists_keep_display_names_and_flatten_groups() -> None:
    raw = _msg(
        'From: "Doe, Jane" <jane@example.org>',
        "To: Bob <bob@example.test>, team: carol@example.test, Dan <dan@example.test>;,"
        " =?UTF-8?Q?J=C3=B6rg?= <joerg@example.test>",
        "Cc: undisclosed-recipients:;",
        "Reply-To: replies@example.org")
    parsed = _parse(raw).message
    sender = getattr(parsed, "from")
    assert (sender.name, sender.email) == ("Doe, Jane", "jane@example.org")
    assert [(a.name, a.email) for a in parsed.to] == [
        ("Bob", "bob@example.test"), ("", "carol@example.test"),
        ("Dan", "dan@example.test"), ("Jörg", "joerg@example.test")]
    assert list(parsed.cc) == []
    assert [a.email for a in parsed.reply_to] == ["replies@example.org"]


def test_date_header_becomes_a_utc_timestamp() -> None:
    raw = _msg("From: a@example.org", "Date: Tue, 10 May 2005 11:26:39 -0600")
    parsed = _parse(raw).message
    assert parsed.date.ToDatetime(tzinfo=UTC) == datetime(2005, 5, 10, 17, 26, 39, tzinfo=UTC)
    assert not any(p.startswith("Date") for p in parsed.parse_problems)


@pytest.mark.parametrize("header", [None, "Date: not a date at all", "Date: 99 Foo 99999 99:99"])
def test_missing_or_unreadable_date_is_left_unset_and_recorded(header: str | None) -> None:
    lines = ["From: a@example.org"] + ([header] if header else [])
    parsed = _parse(_msg(*lines)).message
    assert not parsed.HasField("date")
    assert any(p.startswith("Date") for p in parsed.parse_problems)


def test_unknown_charset_is_read_with_replacement_and_recorded() -> None:
    raw = _msg("From: a@example.org", "Content-Type: text/plain; charset=x-no-such-charset",
               body="caf\xe9 ok")
    raw = raw.replace("café".encode(), b"caf\xe9")
    parsed = _parse(raw).message
    assert parsed.text.startswith("caf\ufffd ok")
    assert any("unknown charset" in p for p in parsed.parse_problems)


def test_bad_base64_is_decoded_leniently_and_recorded() -> None:
    raw = _msg("From: a@example.org", "Content-Type: text/plain; charset=utf-8",
               "Content-Transfer-Encoding: base64", body="aGVsbG8gd29ybGQ!!!===\r\n*&^")
    parsed = _parse(raw).message
    assert parsed.text.startswith("hello world")
    assert any("base64" in p for p in parsed.parse_problems)


def test_text_declared_ascii_but_utf8_is_read_as_utf8() -> None:
    raw = _msg("From: a@example.org", "Content-Type: text/plain; charset=us-ascii",
               body="na\u00efve")
    assert _parse(raw).message.text == "na\u00efve"


def test_body_longer_than_the_cap_is_cut_and_recorded() -> None:
    raw = _msg("From: a@example.org", "Content-Type: text/plain; charset=utf-8",
               body="é" * 5000)
    parsed = _parse(raw, max_body_bytes=1001).message
    assert parsed.text == "é" * 500
    assert any("was cut" in p for p in parsed.parse_problems)


def test_corpus_attachment_bytes_are_decoded_exactly() -> None:
    rel = "ruby-mail-gem/attachment_emails/attachment_pdf.eml"
    assert int(_manifest()[rel]["attachments"]) == 1
    raw = (CORPUS / rel).read_bytes()
    parsed = _parse(raw)
    (att,) = parsed.message.attachments
    # Decode the base64 section independently of the email package.
    section = raw.split(b'filename="broken.pdf"')[1].split(b"------=_Part_2192")[0]
    expected = base64.b64decode(b"".join(section.split()))
    assert att.filename == "broken.pdf"
    assert att.content_type == "application/pdf"
    assert parsed.attachment_data == [expected]
    assert expected.startswith(b"%PDF")
    assert att.size == len(expected)
    assert parsed.message.subject == "Another PDF with 🎉 Unicode chars in it 🍿"


def test_attached_message_is_an_attachment_named_eml() -> None:
    raw = (CORPUS / "mimekit/messages/simple-embedded-message.eml").read_bytes()
    parsed = _parse(raw)
    (att,) = parsed.message.attachments
    assert att.content_type == "message/rfc822"
    assert att.filename.endswith(".eml")
    inner = _parse(parsed.attachment_data[0]).message
    assert inner.subject


# limits


def _nested(depth: int) -> bytes:
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\ninnermost" + tail


def test_nesting_deeper_than_the_limit_stops_descending_and_is_recorded() -> None:
    parsed = _parse(_nested(30), max_depth=10).message
    assert parsed.subject == "deep"
    assert parsed.text == ""
    assert any("nesting deeper than 10" in p for p in parsed.parse_problems)


def test_nesting_within_the_limit_reaches_the_innermost_text() -> None:
    assert _parse(_nested(30), max_depth=40).message.text.startswith("innermost")


def test_a_thousand_levels_of_nesting_are_read_to_the_limit() -> None:
    parsed = _parse(_nested(1000)).message
    assert parsed.subject == "deep"
    assert any("nesting deeper than 50" in p for p in parsed.parse_problems)


def _many_parts(count: int) -> bytes:
    body = b"".join(b"--B\r\nContent-Type: application/x-part\r\n\r\npart %d\r\n" % i
                    for i in range(count))
    return b"Subject: many\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n" + body \
        + b"--B--\r\n"


def test_more_parts_than_the_limit_keeps_what_was_read_and_records_it() -> None:
    parsed = _parse(_many_parts(50), max_parts=10)
    assert 1 <= len(parsed.message.attachments) < 10
    assert parsed.attachment_data[0] == b"part 0"
    assert any("more than 10 MIME parts" in p for p in parsed.message.parse_problems)


def test_a_hundred_thousand_parts_are_read_to_the_limit() -> None:
    parsed = _parse(_many_parts(100_000)).message
    assert 0 < len(parsed.attachments) < 1000
    assert any("more than 1000 MIME parts" in p for p in parsed.parse_problems)


def test_a_one_megabyte_address_header_is_read_leniently() -> None:
    raw = b"To: " + b"a@example.org, " * 70_000 + b"\r\nSubject: big\r\n\r\nbody"
    parsed = _parse(raw).message
    assert parsed.subject == "big"
    assert len(parsed.to) == 1000
    assert any("read leniently" in p for p in parsed.parse_problems)


def test_a_one_megabyte_subject_is_cut() -> None:
    parsed = _parse(b"Subject: " + b"x" * (1 << 20) + b"\r\n\r\nbody").message
    assert parsed.subject == "x" * 4096
    assert parsed.text == "body"


# never raises


def test_every_corpus_message_parses_without_raising() -> None:
    count = 0
    for name, raw in _corpus_messages():
        parsed = _parse(raw)
        parsed.message.SerializeToString()  # every string field is valid UTF-8
        assert len(parsed.attachment_data) == len(parsed.message.attachments), name
        count += 1
    assert count > 200


def test_mbox_files_split_into_their_messages() -> None:
    data = (CORPUS / "mimekit/mbox/simple.mbox.txt").read_bytes()
    messages = split_mbox(data)
    assert len(messages) > 1
    assert all(not m.startswith(b"From ") for m in messages)
    assert split_mbox(b"") == []


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00" * 1000,
    b"Subject: \x00nul\x00\r\nFrom: \x00@\x00\r\n\r\nbody\x00with nul",
    b"\r\n\r\n\r\n",
    b"no header at all",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary",
    b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
    b"Content-Type: text/plain; charset=\"\xff\xfe\"\r\n\r\n\xff\xfe",
    b"From: \xff\xfe <\xfe@\xff>\r\nTo: ;;;,,,<<<>>>@@@\r\nSubject: =?x?Q?bad?=\r\n\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\nbad\r\n",
    b"Date: Mon, 32 Foo 99999999999 25:61:61 +9999\r\n\r\n",
    b"Message-ID: <<<>>>\r\nReferences: <a> <b\r\nIn-Reply-To: \r\n\r\n",
    b"Content-Type: message/rfc822\r\n\r\nContent-Type: message/rfc822\r\n\r\n",
])
def test_garbage_parses_without_raising(raw: bytes) -> None:
    parsed = _parse(raw)
    parsed.message.SerializeToString()


def test_random_bytes_parse_without_raising() -> None:
    rng = random.Random(1234)
    for size in (1, 10, 100, 1000, 10_000, 100_000):
        for _ in range(5):
            _parse(rng.randbytes(size)).message.SerializeToString()


def test_random_mime_shaped_fragments_parse_without_raising() -> None:
    rng = random.Random(99)
    pieces = [b"--b\r\n", b"--b--\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
              b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
              b"Content-Disposition: attachment; filename*0*=utf-8''%ff\r\n",
              b"\r\n", b"From: =?utf-8?b?////?= <a@b>\r\n", b"body\r\n", b"\xff\x00\r"]
    for _ in range(300):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        _parse(raw).message.SerializeToString()


def test_limits_need_no_arguments() -> None:
    assert parse_message(b"Subject: x\r\n\r\n").message.subject == "x"


def test_corpus_path_points_at_the_shared_corpus() -> None:
    assert isinstance(CORPUS, Path)
    assert (CORPUS / "MANIFEST.tsv").exists()


def test_a_long_diff_full_of_dash_lines_is_not_mistaken_for_many_parts() -> None:
    diff = "".join(f"--- a/file{i}\n+++ b/file{i}\n-- removed {i}\n" for i in range(3000))
    raw = _msg("From: a@example.org", "Content-Type: text/plain; charset=utf-8", body=diff)
    parsed = _parse(raw, max_parts=10).message
    assert parsed.text == diff
    assert not any("MIME parts" in p for p in parsed.parse_problems)


# The plain-address fast path must read every header exactly as the full parser does.

_WORDS = ["Ann", "Bob", "a.b", "x", "9", "o'neil", "=?utf-8?q?Z?=", '"Q"', "(c)", "é"]
_HEADER_PIECES = [*_WORDS, "a@b.c", "<a@b.c>", "<x.y@z>", "@", " ", "  ", ",", ", ", "<",
                  ">", ";", ":", ".", "\t"]


def _header_values(seed: int, count: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(_HEADER_PIECES) for _ in range(rng.randint(1, 8))).strip()


def _mailbox_lists(seed: int, count: int) -> Iterator[str]:
    """Address lists close to the plain form, some in it and some just outside."""
    rng = random.Random(seed)
    names = ["Ann", "Bob Smith", "o'neil", "x-y z", "A  B", "9", "Ann.", "é"]
    addrs = ["a@b.c", "x.y@z", "q+tag@ex.ample", "a..b@c", "a@b.", "a@[1.2.3.4]"]
    for _ in range(count):
        items = []
        for _ in range(rng.randint(1, 3)):
            addr, form = rng.choice(addrs), rng.random()
            items.append(addr if form < 0.3 else f"<{addr}>" if form < 0.5
                         else f"{rng.choice(names)} <{addr}>")
        yield rng.choice([", ", ",", " , "]).join(items)


def test_plain_header_fast_paths_match_the_structured_parser(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mailgrid.mime as mime

    values = [*_header_values(7, 800), *_mailbox_lists(11, 600),
              "Sender Person <sender@remote.example>",
              "a@b.c, Bob <b@x.y>", "Bob  Two <b@x.y>", "Bob <b@x.y>, ", "a@b.c,,d@e.f"]
    hits = 0
    dates = itertools.cycle(["Tue, 10 May 2005 11:26:39 -0600", "10 May 2005 11:26 +0000",
                             "Tue, 10 May 2005 11:26:39", "yesterday", "", "Tue, 31 Feb 2005 1:2:3",
                             "Mon, 1 Jan 0001 00:00:00 +0000", "Tue,  10 May 2005  11:26:39 GMT",
                             "1 Jan 99999 00:00:00 +0000"])
    for value in values:
        raw = (f"From: {value}\r\nTo: {value}\r\nSubject: {value}\r\n"
               f"Date: {next(dates)}\r\n\r\nbody\r\n").encode()
        fast = parse_message(raw).message
        hits += mime.simple_addresses(value) is not None
        with monkeypatch.context() as patched:
            patched.setattr(mime, "simple_addresses", lambda raw: None)
            patched.setattr(mime, "_PLAIN_TEXT", re.compile(r"(?!)"))
            slow = parse_message(raw).message
        assert fast == slow, value
    assert hits > 100  # the generators do reach the fast path


@pytest.mark.parametrize(("value", "expected"), [
    ("Tue, 10 May 2005 11:26:39 -0600", "2005-05-10T17:26:39+00:00"),
    ("Tue,  10 May 2005  11:26:39 GMT", "2005-05-10T11:26:39+00:00"),
    ("Tue, 10 May 2005 11:26:39", "2005-05-10T11:26:39+00:00"),  # no zone: taken as UTC
    ("yesterday", None), ("Tue, 31 Feb 2005 1:2:3", None)])
def test_date_reads_as_the_structured_header_does(value: str, expected: str | None) -> None:
    parsed = parse_message(f"Date: {value}\r\n\r\nx\r\n".encode())
    message = parsed.message
    got = (message.date.ToDatetime(tzinfo=UTC).isoformat() if message.HasField("date")
           else None)
    assert got == expected
    assert any(p.startswith("Date: unreadable") for p in message.parse_problems) == (
        expected is None)


def test_single_part_fast_path_parses_every_corpus_message_as_the_feed_parser(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mailgrid.mime as mime

    messages = [raw for _, raw in corpus_messages()]
    variants = [*messages, *(smtp_wire_form(raw) for raw in messages)]
    taken = 0
    for raw in variants:
        fast = parse_message(raw)
        taken += mime.single_part(raw) is not None
        with monkeypatch.context() as patched:
            patched.setattr(mime, "single_part", lambda raw: None)
            slow = parse_message(raw)
        assert fast.message == slow.message
        assert fast.attachment_data == slow.attachment_data
    assert taken > 20


_FIELD_NAMES = st.sampled_from(["Subject", "From", "To", "Date", "X-Odd", "content-type",
                                "Received", "Message-ID", "Comments"])
_VALUE_BYTES = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(st.tuples(_FIELD_NAMES, st.lists(_VALUE_BYTES, min_size=1, max_size=3)),
                min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_single_part_headers_are_what_the_header_parser_makes(
        fields: list[tuple[str, list[bytes]]]) -> None:
    # Any well-formed block, folded or not, 8-bit bytes included.
    head = b"".join(name.encode() + b":" + b"\r\n\t".join(values) + b"\r\n"
                    for name, values in fields)
    fast = single_part(head + b"\r\nbody\r\n")
    # Not taken for a multipart/* or message/* Content-Type, or one that cannot parse.
    assume(fast is not None)
    slow = BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n")
    assert list(fast.raw_items()) == list(slow.raw_items())
    assert fast.defects == slow.defects and fast.get_unixfrom() == slow.get_unixfrom()
