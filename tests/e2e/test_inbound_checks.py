"""Inbound checks as a user sees them: over SMTP in, over HTTP out (`mailgrid up`)."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import httpx
import pytest

from tests.e2e.conftest import LaunchSuite
from tests.e2e.mail import add_user, folder, token
from tests.peers.procs import StartDnsPeer, dns_peers

pytestmark = pytest.mark.e2e

__all__ = ["dns_peers"]  # fixtures

ZONE = "\n".join([
    # the SMTP client is 127.0.0.1: good.test lets it send, forged.test does not
    'good.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
    '_dmarc.good.test. 60 IN TXT "v=DMARC1; p=reject"',
    'forged.test. 60 IN TXT "v=spf1 -all"',
    '_dmarc.forged.test. 60 IN TXT "v=DMARC1; p=reject"',
]) + "\n"


def send(smtp: tuple[str, int], sender: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "carol@example.test", subject
    msg["Date"] = "Tue, 10 May 2005 11:26:39 -0600"
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@x.test>"
    msg.set_content("hello\n")
    with smtplib.SMTP(*smtp, timeout=30) as client:
        client.send_message(msg, from_addr=sender, to_addrs=["carol@example.test"])


def test_checks_are_shown_by_the_api_and_spam_moves_feed_the_sender_lists(
        launch_suite: LaunchSuite, dns_peers: StartDnsPeer) -> None:
    dns = dns_peers(ZONE)
    suite = launch_suite(env={"MAILGRID_OUTBOUND_NAMESERVER": f"{dns.host}:{dns.port}",
                              "MAILGRID_INBOUND_AUTH_CHECKS": "true"})
    add_user(suite, "carol@example.test")
    send(suite.smtp_host_port, "news@good.test", "real news")
    send(suite.smtp_host_port, "boss@forged.test", "wire the money")

    with httpx.Client(base_url=suite.http_url, timeout=30) as http:
        auth = token(http, "carol@example.test")
        suite.wait_until(lambda: folder(http, auth, "inbox")["total"] == 1
                         and folder(http, auth, "spam")["total"] == 1, "both filed")
        spam_id = folder(http, auth, "spam")["id"]
        [spam] = http.get(f"/v1/folders/{spam_id}/messages", headers=auth).json()["messages"]
        detail = http.get(f"/v1/messages/{spam['id']}", headers=auth).json()
        assert detail["subject"] == "wire the money"
        assert "dmarc=fail (p=reject) header.from=forged.test" in detail[
            "authentication_results"]
        assert detail["filing_reason"].startswith("DMARC policy p=reject of forged.test")
        assert {"spf_fail", "dmarc_fail"} <= {r["name"] for r in detail["spam"]["rules"]}
        assert detail["spam"]["threshold"] == 5.0

        inbox_id = folder(http, auth, "inbox")["id"]
        [good] = http.get(f"/v1/folders/{inbox_id}/messages", headers=auth).json()["messages"]
        detail = http.get(f"/v1/messages/{good['id']}", headers=auth).json()
        assert detail["authentication_results"].startswith("mx.")
        assert "spf=pass" in detail["authentication_results"]
        assert detail["filing_reason"] is None

        moved = http.patch(f"/v1/messages/{good['id']}", headers=auth,
                           json={"folder_id": "spam"})
        assert moved.status_code == 200, moved.text
        lists = http.get("/v1/sender-lists", headers=auth).json()
        assert lists == {"entries": [{"sender": "news@good.test", "allow": False,
                                      "source": "feedback"}]}

        put = http.put("/v1/sender-lists/good.test", headers=auth, json={"allow": True})
        assert put.status_code == 200, put.text
        assert {"sender": "good.test", "allow": True, "source": "user"} in put.json()[
            "entries"]
        gone = http.delete("/v1/sender-lists/news@good.test", headers=auth)
        assert gone.json() == {"entries": [{"sender": "good.test", "allow": True,
                                            "source": "user"}]}
        bad = http.put("/v1/sender-lists/not%20valid", headers=auth, json={"allow": True})
        assert bad.status_code in (400, 422)
        assert bad.headers["content-type"].startswith("application/problem+json")
