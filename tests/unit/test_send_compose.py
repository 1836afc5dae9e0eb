"""The pure parts of sending: address checks, message building, raw header edits,
routing of recipients, and the AUTH failure counter."""

from __future__ import annotations

from datetime import UTC, datetime
from email.headerregistry import Address

import pytest

from delivery_svc.submit import route
from gateway import compose
from gateway.submission import AuthGuard, with_missing_fields
from mailgrid import crlf
from mailgrid.addresses import parse_address
from mailgrid.errors import InvalidArgument
from mailgrid.settings import Settings

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(("value", "name", "spec"), [
    ("bob@example.test", "", "bob@example.test"),
    ("Bob <bob@Example.TEST>", "Bob", "bob@example.test"),
    ("Bób Ü <bob@exämple.de>", "Bób Ü", "bob@xn--exmple-cua.de"),
    ("=?utf-8?q?B=C3=B6b?= <b@x.example>", "Böb", "b@x.example"),
])
def test_an_address_parses_to_an_ascii_domain(value: str, name: str, spec: str) -> None:
    addr = parse_address(value)
    assert (addr.display_name, addr.addr_spec) == (name, spec)


@pytest.mark.parametrize("value", [
    "bob", "bob@", "@example.test", "bob@@example.test", "a@b.example, c@d.example",
    "group:;", "bob@-x.example", "bob@[127.0.0.1]", '"a b"@example.test',
    "bøb@example.test", "bob@example.test\r\nBcc: eve@evil.test", "bob@exa\0mple.test",
    "x" * 65 + "@example.test",
])
def test_anything_but_one_routable_address_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_address(value)


def test_a_built_message_has_crlf_only_and_bcc_only_in_the_senders_copy() -> None:
    comp = compose.Composition(
        sender=Address(addr_spec="alice@example.test"),
        to=[parse_address("Bob <bob@example.test>")],
        bcc=[parse_address("carol@example.org")], subject="Grüße", text="a\nb\rc\r\nd",
        html="<p>x</p>", attachments=[compose.Attachment("r.pdf", "application/pdf", b"\0")])
    rendered = compose.render(compose.build(comp, now=NOW, message_id="<m@example.test>"),
                              "<m@example.test>")
    assert not crlf.has_bare_cr_or_lf(rendered.sent)
    assert not crlf.has_bare_cr_or_lf(rendered.outgoing)
    assert b"\r\nBcc: carol@example.org\r\n" in rendered.sent
    assert b"carol" not in rendered.outgoing
    assert rendered.recipients == ["bob@example.test", "carol@example.org"]
    assert b"Date: Tue, 02 Jan 2024 03:04:05 +0000\r\n" in rendered.sent
    assert b"Message-ID: <m@example.test>\r\n" in rendered.sent


def test_a_reply_references_the_parents_references_then_the_parent() -> None:
    assert compose.reply_references("p@x", ["a@x", "b@x"]) == ("<p@x>",
                                                               ["<a@x>", "<b@x>", "<p@x>"])
    assert compose.reply_references("p@x", [], "q@x") == ("<p@x>", ["<q@x>", "<p@x>"])
    with pytest.raises(compose.FieldError):
        compose.reply_references("", [])


def test_raw_header_edits_leave_the_body_alone() -> None:
    raw = (b"From: a@example.test\r\nBcc: x@example.org,\r\n y@example.org\r\n"
           b"Subject: s\r\n\r\nBcc: not a header\r\n")
    assert compose.without_fields(raw, ["bcc"]) == (
        b"From: a@example.test\r\nSubject: s\r\n\r\nBcc: not a header\r\n")
    assert compose.has_field(raw, "BCC") and not compose.has_field(raw, "date")
    assert compose.from_addresses(raw) == ["a@example.test"]
    assert compose.from_addresses(b"Subject: s\r\n\r\nbody") is None


def test_an_msa_adds_missing_from_date_and_message_id() -> None:
    added = with_missing_fields(b"Subject: s\r\n\r\nbody\r\n", "a@example.test", True)
    head, body = added.split(b"\r\n\r\n", 1)
    assert body == b"body\r\n"
    assert b"\r\nFrom: a@example.test" in head and b"\r\nDate: " in head
    assert b"@example.test>" in head.split(b"Message-ID: ")[1]
    complete = b"From: a@example.test\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nb\r\n"
    assert with_missing_fields(complete, "a@example.test", False) is complete


def test_recipients_route_to_local_and_remote_domains_once_each() -> None:
    settings = Settings(domains=["example.test"])
    routing = route(settings, ["Bob@Example.test", "x@Remote.Example", "bob@example.test",
                               "y@remote.example.", "z@other.example"])
    assert routing.local == ["bob@example.test"]
    assert routing.remote == {"remote.example": ["x@remote.example", "y@remote.example"],
                              "other.example": ["z@other.example"]}
    with pytest.raises(InvalidArgument):
        route(settings, ["x@bad_domain.example"])


def test_the_auth_guard_blocks_after_the_limit_and_forgets_after_the_window() -> None:
    now = [0.0]
    guard = AuthGuard(max_failures=2, window=60.0, clock=lambda: now[0])
    guard.failed("192.0.2.1")
    assert not guard.blocked("192.0.2.1")
    guard.failed("192.0.2.1")
    assert guard.blocked("192.0.2.1") and not guard.blocked("192.0.2.2")
    now[0] = 61.0
    assert not guard.blocked("192.0.2.1")
