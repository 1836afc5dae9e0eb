"""Conversions the HTTP API applies to what metadata_svc returns."""

from __future__ import annotations

import pytest

from gateway.http_api import content_disposition, role_name, safe_content_type, summary_out
from mailgrid.v1 import common_pb2


def test_content_disposition_carries_an_ascii_fallback_and_the_exact_name() -> None:
    assert content_disposition("Übersicht 2024.pdf") == (
        "attachment; filename=\"_bersicht 2024.pdf\"; "
        "filename*=UTF-8''%C3%9Cbersicht%202024.pdf")


@pytest.mark.parametrize(("name", "fallback"), [
    ("", "attachment"),
    ('a"b\r\n.txt', "a_b.txt"),                 # controls dropped, quote replaced
    ("../../etc/passwd", "_._etc_passwd"),       # no separators, no ".."
    ("invoice\u202efdp.exe", "invoicefdp.exe"),  # no bidi override hiding ".exe"
])
def test_content_disposition_cannot_break_the_header_or_escape(name: str,
                                                               fallback: str) -> None:
    value = content_disposition(name)
    assert f'filename="{fallback}"' in value
    assert "\r" not in value and "\n" not in value


@pytest.mark.parametrize(("given", "served"), [
    ("image/png", "image/png"),
    ("Application/PDF", "application/pdf"),
    ("text/html; charset=utf-8", "application/octet-stream"),
    ("text/html\r\nX-Evil: 1", "application/octet-stream"),
    ("", "application/octet-stream"),
])
def test_only_plain_content_types_are_passed_on(given: str, served: str) -> None:
    assert safe_content_type(given) == served


def test_roles_are_lower_case_names() -> None:
    assert role_name(common_pb2.FOLDER_ROLE_INBOX) == "inbox"
    assert role_name(common_pb2.FOLDER_ROLE_CUSTOM) == "custom"
    assert role_name(common_pb2.FOLDER_ROLE_UNSPECIFIED) == "custom"


def test_a_summary_uses_from_and_rfc_3339_dates() -> None:
    summary = common_pb2.MessageSummary(email_id="e1", subject="hi", size=10)
    getattr(summary, "from").email = "a@example.org"
    summary.date.FromSeconds(1_700_000_000)
    body = summary_out(summary).model_dump(mode="json", by_alias=True)
    assert body["from"] == {"name": "", "email": "a@example.org"}
    assert body["date"] == "2023-11-14T22:13:20Z"


def test_a_summary_without_a_date_says_null() -> None:
    body = summary_out(common_pb2.MessageSummary(email_id="e1")).model_dump(mode="json")
    assert body["date"] is None
