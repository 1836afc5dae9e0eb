"""The SMTP submission listener with smtplib as the mail client: STARTTLS with the
generated certificate pinned, AUTH against the user store, and the submission policy.

smtplib blocks, and the services run on the test's event loop: every client dialogue
runs in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import httpx
import pytest
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from gateway.app import GatewayApp
from gateway.tls import self_signed_paths
from mailgrid.settings import Settings, split_host_port
from metadata_svc.app import MetadataApp
from tests.integration.send.kit import (
    Account,
    gateway_settings,
    messages,
    outbound_jobs,
    raw,
    settle,
    wait_messages,
)

T = TypeVar("T")
QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-F]{24})$")
S235_AUTH_OK = (235, b"2.7.0 Authentication successful")
S421_BLOCKED = (421, b"4.7.0 Too many failed authentication attempts, try again later")
S530_AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
S535_INVALID = (535, b"5.7.8 Authentication credentials invalid")
S538_ENCRYPTION_REQUIRED = (538, b"5.7.11 Encryption required for requested "
                                 b"authentication mechanism")
S550_BARE_LF = (550, b"5.6.0 Message contains bare CR or LF (RFC 5321 2.3.8)")
S553_NOT_YOUR_SENDER = (553, b"5.7.1 Sender address rejected: not owned by the "
                             b"authenticated user")
S553_NOT_YOUR_FROM = (553, b"5.7.1 From header address not owned by the authenticated user")
S550_UNKNOWN = (550, b"5.1.1 <nobody@example.test>: Recipient address rejected: "
                     b"User unknown")


def plain(address: str, password: str) -> str:
    return base64.b64encode(f"\0{address}\0{password}".encode()).decode()


def message(sender: str, to: str, subject: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\n{extra}Subject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.example>\r\n\r\n"
            f"Hello from a mail client.\r\n").encode()


class Client:
    """smtplib against one gateway's submission port (use it in a thread)."""

    def __init__(self, gateway: GatewayApp) -> None:
        self.host, self.port = split_host_port(gateway.submission_addr)
        cert = self_signed_paths(gateway.settings)[1]
        # Pinned: the generated certificate is the only trust anchor (its SAN names
        # 127.0.0.1, so hostname checking stays on).
        self.context = ssl.create_default_context(cafile=str(cert))

    def connect(self, tls: bool = True) -> smtplib.SMTP:
        client = smtplib.SMTP(self.host, self.port, timeout=30)
        client.ehlo("client.example.test")
        if tls:
            client.starttls(context=self.context)
            client.ehlo("client.example.test")
        return client

    def logged_in(self, user: Account) -> smtplib.SMTP:
        client = self.connect()
        client.login(user.address, user.password)
        return client


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


@pytest.fixture
def client(gateway: GatewayApp) -> Client:
    return Client(gateway)


# ---- accepted ------------------------------------------------------------------------

async def test_starttls_and_login_then_local_delivery_lands_once_in_inbox_and_sent(
        client: Client, http: httpx.AsyncClient, alice: Account, bob: Account,
        carol: Account, delivery: DeliveryApp, js: JetStreamContext) -> None:
    data = message("Alice <alice@example.test>", "bob@example.test", "Status report",
                   extra="Bcc: carol@example.org\r\n")

    def dialogue() -> tuple[int, bytes]:
        with client.logged_in(alice) as smtp:
            smtp.mail("alice@example.test")
            for rcpt in ("bob@example.test", "carol@example.org"):
                assert smtp.rcpt(rcpt)[0] == 250
            return smtp.data(data)

    code, reply = await in_thread(dialogue)
    assert code == 250 and QUEUED.match(reply), reply
    [to_bob] = await wait_messages(http, bob, "inbox", 1)
    [to_carol] = await wait_messages(http, carol, "inbox", 1)
    [sent] = await wait_messages(http, alice, "sent", 1)
    assert to_bob["subject"] == to_carol["subject"] == sent["subject"] == "Status report"
    for user, email in ((bob, to_bob), (carol, to_carol)):
        stored = await raw(http, user, email["id"])
        assert b"carol@example.org" not in stored and b"\r\nBcc:" not in stored
    sent_raw = await raw(http, alice, sent["id"])
    assert b"\r\nBcc: carol@example.org\r\n" in sent_raw
    # Our Received header names TLS and AUTH (RFC 3848 ESMTPSA) and the submission id.
    queue_id = QUEUED.match(reply).group(1)  # type: ignore[union-attr]
    assert sent_raw.startswith(b"Received: from client.example.test")
    assert b"with ESMTPSA id " + queue_id in sent_raw.split(b"\r\n\r\n")[0]
    await settle(delivery, js)
    assert len(await messages(http, bob, "inbox")) == 1
    assert len(await messages(http, alice, "sent")) == 1


async def test_auth_login_works_and_ehlo_offers_auth_only_after_starttls(
        client: Client, alice: Account) -> None:
    def dialogue() -> tuple[bool, bool, bool, str, tuple[int, bytes]]:
        smtp = client.connect(tls=False)
        try:
            before = (smtp.has_extn("starttls"), smtp.has_extn("auth"))
            smtp.starttls(context=client.context)
            smtp.ehlo("client.example.test")
            mechanisms = smtp.esmtp_features.get("auth", "")
            smtp.user, smtp.password = alice.address, alice.password
            return (*before, smtp.has_extn("auth"), mechanisms,
                    smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False))
        finally:
            smtp.quit()

    starttls, auth_before, auth_after, mechanisms, result = await in_thread(dialogue)
    assert starttls and not auth_before and auth_after
    assert mechanisms.split() == ["LOGIN", "PLAIN"]
    assert result == S235_AUTH_OK


async def test_missing_from_date_and_message_id_are_added(
        client: Client, http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    data = b"To: bob@example.test\r\nSubject: bare\r\n\r\nJust a body.\r\n"

    def dialogue() -> tuple[int, bytes]:
        with client.logged_in(alice) as smtp:
            smtp.mail("alice@example.test")
            smtp.rcpt("bob@example.test")
            return smtp.data(data)

    assert (await in_thread(dialogue))[0] == 250
    [got] = await wait_messages(http, bob, "inbox", 1)
    head = (await raw(http, bob, got["id"])).split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"\r\nFrom: alice@example.test\r\n" in head
    assert re.search(rb"\r\nDate: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} ", head)
    assert re.search(rb"\r\nMessage-ID: <[^<>@\s]+@example\.test>\r\n", head)


async def test_remote_recipients_are_accepted_and_queued_per_domain(
        client: Client, http: httpx.AsyncClient, alice: Account,
        js: JetStreamContext) -> None:
    data = message("alice@example.test", "x@remote.example", "Outbound")

    def dialogue() -> tuple[int, bytes]:
        with client.logged_in(alice) as smtp:
            smtp.mail("alice@example.test")
            for rcpt in ("x@remote.example", "y@remote.example", "z@other.example"):
                assert smtp.rcpt(rcpt)[0] == 250
            return smtp.data(data)

    assert (await in_thread(dialogue))[0] == 250
    jobs = {subject: job for subject, _, job in await outbound_jobs(js)}
    assert sorted(jobs) == ["mail.outbound.other.example", "mail.outbound.remote.example"]
    assert list(jobs["mail.outbound.remote.example"].rcpt_to) == [
        "x@remote.example", "y@remote.example"]
    assert jobs["mail.outbound.remote.example"].message_id == "Outbound@client.example"
    await wait_messages(http, alice, "sent", 1)


# ---- refused -------------------------------------------------------------------------

async def test_auth_before_starttls_is_538_5_7_11(client: Client, alice: Account) -> None:
    def dialogue() -> tuple[int, bytes]:
        with client.connect(tls=False) as smtp:
            return smtp.docmd("AUTH", f"PLAIN {plain(alice.address, alice.password)}")

    assert await in_thread(dialogue) == S538_ENCRYPTION_REQUIRED


async def test_mail_without_auth_is_530_5_7_0(client: Client, alice: Account) -> None:
    def dialogue() -> list[tuple[int, bytes]]:
        replies = []
        with client.connect(tls=False) as smtp:
            replies.append(smtp.mail("alice@example.test"))
        with client.connect() as smtp:
            replies.append(smtp.mail("alice@example.test"))
            replies.append(smtp.rcpt("bob@example.test"))
        return replies

    assert await in_thread(dialogue) == [S530_AUTH_REQUIRED] * 3


async def test_bad_credentials_are_535_and_the_failure_limit_closes_with_421(
        client: Client, alice: Account) -> None:
    # app_settings: submission_auth_max_failures = 3
    def dialogue() -> tuple[list[tuple[int, bytes]], tuple[int, bytes], tuple[int, bytes]]:
        failures = []
        with client.connect() as smtp:
            for password in ("wrong", "wrong again", ""):
                failures.append(smtp.docmd("AUTH", f"PLAIN {plain(alice.address, password)}"))
            blocked = smtp.docmd("AUTH", f"PLAIN {plain(alice.address, alice.password)}")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.noop()
        # A new connection from the same address: still refused, right password or not.
        smtp = client.connect()
        again = smtp.docmd("AUTH", f"PLAIN {plain(alice.address, alice.password)}")
        smtp.close()
        return failures, blocked, again

    failures, blocked, again = await in_thread(dialogue)
    assert failures == [S535_INVALID] * 3
    assert blocked == again == S421_BLOCKED


async def test_an_unknown_user_gets_the_same_535(client: Client, alice: Account) -> None:
    def dialogue() -> tuple[int, bytes]:
        with client.connect() as smtp:
            return smtp.docmd("AUTH", f"PLAIN {plain('nobody@example.test', 'x')}")

    assert await in_thread(dialogue) == S535_INVALID


async def test_mail_from_another_address_is_553_5_7_1(client: Client, alice: Account,
                                                      bob: Account) -> None:
    def dialogue() -> list[tuple[int, bytes]]:
        with client.logged_in(alice) as smtp:
            return [smtp.mail("bob@example.test"), smtp.mail("<>"),
                    smtp.mail("ALICE@example.test")]

    refused, null, case = await in_thread(dialogue)
    assert refused == null == S553_NOT_YOUR_SENDER
    assert case[0] == 250  # addresses compare without case


async def test_a_from_header_of_another_address_is_553_at_end_of_data(
        client: Client, http: httpx.AsyncClient, alice: Account, bob: Account,
        delivery: DeliveryApp, js: JetStreamContext) -> None:
    forged = message("Bob <bob@example.test>", "bob@example.test", "Forged")
    two = message("alice@example.test, bob@example.test", "bob@example.test", "Two")

    def dialogue() -> list[tuple[int, bytes]]:
        replies = []
        with client.logged_in(alice) as smtp:
            for data in (forged, two):
                smtp.mail("alice@example.test")
                smtp.rcpt("bob@example.test")
                replies.append(smtp.data(data))
        return replies

    assert await in_thread(dialogue) == [S553_NOT_YOUR_FROM] * 2
    await settle(delivery, js)
    assert await messages(http, bob, "inbox") == []
    assert await messages(http, alice, "sent") == []


async def test_bare_lf_in_data_is_550_5_6_0(client: Client, http: httpx.AsyncClient,
                                            alice: Account, bob: Account) -> None:
    def dialogue() -> tuple[int, bytes]:
        with client.logged_in(alice) as smtp:
            smtp.mail("alice@example.test")
            smtp.rcpt("bob@example.test")
            assert smtp.docmd("DATA")[0] == 354
            # smtplib.data() would repair the line ends: write the bytes ourselves.
            smtp.send(b"From: alice@example.test\r\nSubject: x\r\n\r\nbare\nLF\r\n.\r\n")
            return smtp.getreply()

    assert await in_thread(dialogue) == S550_BARE_LF
    assert await messages(http, alice, "sent") == []


async def test_an_unknown_local_recipient_is_550_5_1_1_at_rcpt(
        client: Client, alice: Account) -> None:
    def dialogue() -> tuple[int, bytes]:
        with client.logged_in(alice) as smtp:
            smtp.mail("alice@example.test")
            return smtp.rcpt("nobody@example.test")

    assert await in_thread(dialogue) == S550_UNKNOWN


# ---- plaintext AUTH on loopback, when allowed ------------------------------------------

@pytest.fixture
async def loopback_gateway(app_settings: Settings, metadata: MetadataApp,
                           delivery: DeliveryApp) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(gateway_settings(app_settings, metadata, delivery,
                                      submission_auth_plaintext_loopback=True))
    await app.start()
    yield app
    await app.stop()


async def test_plaintext_auth_is_allowed_on_loopback_when_configured(
        loopback_gateway: GatewayApp, http: httpx.AsyncClient, alice: Account,
        bob: Account) -> None:
    client = Client(loopback_gateway)

    def dialogue() -> tuple[int, bytes]:
        with client.connect(tls=False) as smtp:
            assert smtp.has_extn("auth")
            smtp.login(alice.address, alice.password)
            smtp.mail("alice@example.test")
            smtp.rcpt("bob@example.test")
            return smtp.data(message("alice@example.test", "bob@example.test", "Local"))

    assert (await in_thread(dialogue))[0] == 250
    await wait_messages(http, bob, "inbox", 1)
