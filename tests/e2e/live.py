"""What the end-to-end tests do as a webmail page holding a live event WebSocket."""

from __future__ import annotations

import asyncio
import json
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.conftest import Suite
from tests.e2e.mail import PASSWORD, send

WAIT = 30.0


def ws_url(suite: Suite, since: str | None = None) -> str:
    return f"ws://{suite.http_addr}/v1/events" + (f"?since={since}" if since else "")


async def bearer(suite: Suite, address: str) -> str:
    async with httpx.AsyncClient(base_url=suite.http_url, timeout=30) as http:
        reply = await http.post("/v1/auth/token",
                                json={"address": address, "password": PASSWORD})
        assert reply.status_code == 200, reply.text
        token: str = reply.json()["access_token"]
        return token


class Live:
    """One open /v1/events WebSocket of one user."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.cursor: str | None = None

    @classmethod
    async def open(cls, suite: Suite, token: str, since: str | None = None,
                   header_auth: bool = True) -> Live:
        """Connected and authenticated; returns before ``ready`` (see ``until_ready``)."""
        headers = {"Authorization": f"Bearer {token}"} if header_auth else {}
        ws = await connect(ws_url(suite, since), additional_headers=headers,
                           open_timeout=WAIT)
        if not header_auth:
            await ws.send(json.dumps({"token": token}))
        return cls(ws)

    async def next(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
        self.cursor = message["cursor"]
        return message

    async def until_ready(self) -> list[dict[str, Any]]:
        """The catch-up events before ``ready``."""
        found: list[dict[str, Any]] = []
        while (message := await self.next())["type"] != "ready":
            if message["type"] != "heartbeat":
                found.append(message)
        return found

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` mailbox events (ready and heartbeats skipped)."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            message = await self.next()
            if message["type"] not in ("ready", "heartbeat"):
                found.append(message)
        return found

    async def close_code(self) -> int | None:
        """Waits until the server closes the socket; its close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), WAIT)
        except Exception:  # ConnectionClosed*, what we wait for
            pass
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


def message(rcpt: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "peer@remote.test", rcpt, subject
    msg["Message-ID"] = make_msgid(domain="remote.test")
    msg.set_content(f"{subject}\n")
    return msg.as_bytes(policy=policy.SMTP)


async def deliver(suite: Suite, rcpt: str, subject: str) -> None:
    """One SMTP transaction to ``rcpt`` (in a thread: smtplib blocks)."""
    code, reply = await asyncio.to_thread(send, suite, [rcpt], message(rcpt, subject))
    assert code == 250, reply


def subjects(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"]["subject"] for e in events]
