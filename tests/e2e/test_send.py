"""Sending with `mailgrid up`: the HTTP send call and SMTP submission, user A to user B."""

from __future__ import annotations

import smtplib
import ssl

import httpx
import pytest

from tests.e2e.conftest import Suite, wait_for
from tests.e2e.mail import PASSWORD, add_user, all_messages, token

pytestmark = pytest.mark.e2e


def test_a_sends_to_b_over_the_api_and_over_submission(shared_suite: Suite) -> None:
    suite = shared_suite
    assert "(not yet served)" not in suite.output()
    add_user(suite, "ann@example.test")
    add_user(suite, "ben@example.org")
    with httpx.Client(base_url=suite.http_url, timeout=30) as http:
        ann, ben = token(http, "ann@example.test"), token(http, "ben@example.org")
        reply = http.post("/v1/messages", headers=ann, json={
            "to": ["Ben <ben@example.org>"], "subject": "over the API", "text": "hi"})
        assert reply.status_code == 202, reply.text

        host, _, port = suite.submission_addr.rpartition(":")
        context = ssl.create_default_context(
            cafile=str(suite.data_dir / "tls" / "submission.crt"))
        with smtplib.SMTP(host, int(port), timeout=30) as smtp:
            smtp.starttls(context=context)
            smtp.login("ann@example.test", PASSWORD)
            smtp.sendmail("ann@example.test", ["ben@example.org"],
                          b"From: ann@example.test\r\nTo: ben@example.org\r\n"
                          b"Subject: over submission\r\n\r\nhello\r\n")

        wait_for(lambda: len(all_messages(http, ben)) >= 2, "Ben's two messages", 30,
                 details=suite.log)
        assert sorted(m["subject"] for m in all_messages(http, ben)) == [
            "over submission", "over the API"]
        assert sorted(m["subject"] for m in all_messages(http, ann, "sent")) == [
            "over submission", "over the API"]
