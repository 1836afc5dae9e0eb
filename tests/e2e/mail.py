"""What the end-to-end tests do as a mail client and an HTTP user would."""

from __future__ import annotations

import re
import smtplib
from typing import Any

import httpx

from tests.e2e.conftest import Suite

PASSWORD = "correct horse battery staple"


def smtp_wire_form(data: bytes) -> bytes:
    """The bytes an SMTP client transmits for a file: every line ending CRLF (a sending
    MTA canonicalises line endings) and a final CRLF before the end-of-data dot."""
    wire = re.sub(rb"\r?\n", b"\r\n", data)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


def strip_received(raw: bytes) -> bytes:
    """The stored bytes without the Received header we prepend (and its folded lines)."""
    assert raw.startswith(b"Received: from "), raw[:200]
    lines = raw.split(b"\r\n")
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\r\n".join(lines[end:])


def add_user(suite: Suite, address: str) -> None:
    done = suite.cli("user", "add", address, "--password", PASSWORD)
    assert done.returncode == 0, done.stderr


def token(http: httpx.Client, address: str) -> dict[str, str]:
    reply = http.post("/v1/auth/token", json={"address": address, "password": PASSWORD})
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


def folder(http: httpx.Client, auth: dict[str, str], role: str) -> dict[str, Any]:
    reply = http.get("/v1/folders", headers=auth)
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = next(f for f in reply.json()["folders"] if f["role"] == role)
    return found


def all_messages(http: httpx.Client, auth: dict[str, str], role: str = "inbox"
                 ) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    cursor = ""
    while True:
        url = f"/v1/folders/{role}/messages?limit=200" + (f"&cursor={cursor}" if cursor else "")
        page = http.get(url, headers=auth)
        assert page.status_code == 200, page.text
        body = page.json()
        messages.extend(body["messages"])
        if not body["next_cursor"]:
            return messages
        cursor = body["next_cursor"]


def send(suite: Suite, rcpts: list[str], data: bytes, sender: str = "peer@remote.test"
         ) -> tuple[int, bytes]:
    """One SMTP transaction; returns the reply to DATA."""
    host, port = suite.smtp_host_port
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("peer.remote.test")
        client.mail(sender)
        for rcpt in rcpts:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        return client.data(data)
