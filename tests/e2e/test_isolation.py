"""No user ever sees another user's mail: through the real flow, SMTP in, HTTP out."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage

import httpx
import pytest

from tests.e2e.conftest import Suite
from tests.e2e.mail import add_user, all_messages, folder, send, token

pytestmark = pytest.mark.e2e


def message_with_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "peer@remote.test", "alice@example.test", "secret"
    msg.set_content("for alice only\n")
    msg.add_attachment(b"%PDF-1.4 alice's contract", maintype="application",
                       subtype="pdf", filename="contract.pdf")
    return msg.as_bytes(policy=policy.SMTP)


def test_a_second_user_reaches_none_of_the_first_users_mail(suite: Suite) -> None:
    add_user(suite, "alice@example.test")
    add_user(suite, "bob@example.test")
    code, _ = send(suite, ["alice@example.test"], message_with_attachment())
    assert code == 250

    with httpx.Client(base_url=suite.http_url, timeout=30) as http:
        alice, bob = token(http, "alice@example.test"), token(http, "bob@example.test")
        suite.wait_until(lambda: folder(http, alice, "inbox")["total"] == 1, "delivery")
        (summary,) = all_messages(http, alice)
        detail = http.get(f"/v1/messages/{summary['id']}", headers=alice).json()
        (attachment,) = detail["attachments"]
        base = f"/v1/messages/{summary['id']}"
        assert http.get(f"{base}/attachments/{attachment['id']}",
                        headers=alice).content == b"%PDF-1.4 alice's contract"

        attempts = [
            http.get(base, headers=bob),
            http.get(f"{base}/raw", headers=bob),
            http.get(f"{base}/attachments/{attachment['id']}", headers=bob),
            http.patch(base, json={"is_read": True}, headers=bob),
            http.patch(base, json={"folder_id": "trash"}, headers=bob),
            http.delete(base, headers=bob),
            http.get(f"/v1/folders/{summary['folder_id']}/messages", headers=bob),
        ]
        for reply in attempts:
            assert reply.status_code == 404, (reply.request.method, reply.request.url)
            assert reply.headers["content-type"].startswith("application/problem+json")
            assert "secret" not in reply.text and "contract" not in reply.text

        for role in ("inbox", "sent", "drafts", "trash", "spam", "archive"):
            assert all_messages(http, bob, role) == []
        # Bob's attempts changed nothing of Alice's.
        after = http.get(base, headers=alice).json()
        assert after["is_read"] is False
        assert after["folder_id"] == summary["folder_id"]
