"""The pure parts of outbound delivery: routes, backoff, job ids, replies, DSNs, DKIM."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from pathlib import Path

import pytest

from delivery_svc.dkim_sign import DkimSigner, from_domain
from delivery_svc.dsn import Report, build_dsn, header_block, original_message_id
from delivery_svc.outbound import BlobCache, backoff, derived_job_id, root_job_id
from delivery_svc.routing import parse_routes
from delivery_svc.smtp_out import (
    Outcome,
    RcptResult,
    one_line,
    status_of,
)
from mailgrid import crlf
from mailgrid.errors import InvalidArgument
from mailgrid.settings import Settings

ORIGINAL = (b"From: Alice <alice@example.test>\r\nTo: bob@example.net\r\n"
            b"Subject: hello\r\nMessage-ID: <m1@example.test>\r\n\r\nbody\r\n")


def test_routes_parse_domains_hosts_and_a_wildcard() -> None:
    assert parse_routes(" Example.NET=127.0.0.1:2525, *=[::1]:25 ,") == {
        "example.net": ("127.0.0.1", 2525), "*": ("::1", 25)}
    assert parse_routes("") == {}


@pytest.mark.parametrize("bad", ["example.net", "=h:25", "example.net=host", "a=h:x"])
def test_malformed_route_is_an_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="outbound route"):
        parse_routes(bad)


def test_backoff_doubles_from_the_first_delay_up_to_the_maximum() -> None:
    settings = Settings()  # Postfix-like defaults: 300 s doubling, at most 4000 s
    assert [backoff(settings, n) for n in range(1, 7)] == [
        300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0]


def test_derived_job_ids_keep_the_root_and_are_deterministic() -> None:
    first = derived_job_id("sub-1-example.net", "a1")
    assert first == "sub-1-example.net+a1"
    assert derived_job_id(first, "a2") == "sub-1-example.net+a2"
    assert root_job_id(derived_job_id(first, "r17f")) == "sub-1-example.net"


def test_status_comes_from_the_reply_or_its_code() -> None:
    assert status_of(550, "5.1.1 No such user") == "5.1.1"
    assert status_of(451, "Try later") == "4.0.0"
    assert status_of(550, "4.1.1 mismatched class") == "5.0.0"  # RFC 3463: classes agree


def test_one_line_flattens_replies_for_headers() -> None:
    assert one_line("550-5.1.1 first\n550 5.1.1 second\r\n\té") == \
        "550-5.1.1 first 550 5.1.1 second ?"


def _failed(rcpt: str, status: str, text: str) -> RcptResult:
    return RcptResult(rcpt, Outcome.FAILED, status, text, "mx.example.net", smtp_reply=True)


def test_dsn_is_a_multipart_report_with_one_group_per_recipient() -> None:
    report = Report(reporting_mta="mx.example.test", postmaster_domain="example.test",
                    sender="alice@example.test", job_id="job-1",
                    arrival=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
                    results=[_failed("bob@example.net", "5.1.1", "550 5.1.1 unknown"),
                             _failed("eve@example.net", "5.7.1", "554 5.7.1 no")],
                    original=ORIGINAL)
    raw = build_dsn(report)
    assert not crlf.has_bare_cr_or_lf(raw)
    dsn = email.message_from_bytes(raw)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn["In-Reply-To"] == "<m1@example.test>"
    human, status, headers = dsn.get_payload()  # type: ignore[misc]
    assert "bob@example.net" in human.get_payload()
    per_message, bob, eve = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["Arrival-Date"] == "Thu, 02 Jan 2025 03:04:05 +0000"
    assert (bob["Final-Recipient"], bob["Status"], bob["Remote-MTA"]) == (
        "rfc822; bob@example.net", "5.1.1", "dns; mx.example.net")
    assert eve["Diagnostic-Code"] == "smtp; 554 5.7.1 no"
    assert headers.get_payload(decode=True) == header_block(ORIGINAL)
    assert b"body" not in raw.split(b"text/rfc822-headers")[1]


def test_dsn_without_the_original_says_so() -> None:
    report = Report(reporting_mta="mx", postmaster_domain="example.test", sender="a@b",
                    job_id="j", arrival=datetime.now(UTC), original=None,
                    results=[_failed("x@y", "5.3.0", "gone")])
    assert b"no longer available" in build_dsn(report)
    assert original_message_id(None) == ""


def test_from_domain_reads_folded_headers() -> None:
    assert from_domain(b"Subject: x\r\nFrom:\r\n \"A, B\" <a@Example.TEST>\r\n\r\n") == \
        "example.test"
    assert from_domain(b"Subject: x\r\n\r\nFrom: a@b\r\n") == ""


def test_signer_leaves_mail_without_a_key_unchanged(tmp_path: Path) -> None:
    signer = DkimSigner(tmp_path / "dkim", "mail")
    assert signer.sign(ORIGINAL) == ORIGINAL
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dkim" / "sel2._domainkey.example.test.key").write_bytes(b"pem")
    key = signer.find_key("example.test")
    assert key is not None and key.selector == "sel2"
    assert signer.find_key("../example.test") is None


def test_blob_cache_evicts_the_least_recently_used_beyond_its_size() -> None:
    cache = BlobCache(max_bytes=40)
    cache.put("a", b"x" * 10)
    cache.put("b", b"y" * 10)
    cache.put("huge", b"z" * 11)  # over a quarter of the cache: not kept
    assert cache.get("a") == b"x" * 10  # a is now the most recent
    cache.put("c", b"w" * 10)
    cache.put("d", b"v" * 10)
    cache.put("e", b"u" * 10)
    assert cache.get("huge") is None and cache.get("b") is None
    assert cache.get("a") is not None and cache.get("e") is not None
