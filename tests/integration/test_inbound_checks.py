"""Inbound SPF/DKIM/DMARC, spam score and sender lists: real DNS server, real services.

A DNS server process answers for the test domains (SPF, DKIM key, DMARC records); jobs
are published on mail.inbound as the SMTP edge would, with the client address each case
needs; a real delivery_svc files them through a real metadata_svc.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from email.message import EmailMessage

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from delivery_svc.checks.auth import AuthChecker
from delivery_svc.routing import make_sync_resolver
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2
from metadata_svc.app import MetadataApp
from tests.conftest import CORPUS
from tests.e2e.mail import smtp_wire_form
from tests.e2e.test_corpus import corpus_messages
from tests.integration.test_inbound_worker import PASSWORD, eventually, js
from tests.peers.procs import DnsPeer, StartDnsPeer, dns_peers

__all__ = ["dns_peers", "js"]  # fixtures

GOOD_IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"


def _key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


PEM, PUBLIC = _key()


def _txt(record: str) -> str:
    return " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))


ZONE = "\n".join([
    # good.test: SPF for GOOD_IP, a DKIM key, DMARC p=reject
    f'good.test. 60 IN TXT "v=spf1 ip4:{GOOD_IP} -all"',
    f"sel._domainkey.good.test. 60 IN TXT {_txt(f'v=DKIM1; k=rsa; p={PUBLIC}')}",
    '_dmarc.good.test. 60 IN TXT "v=DMARC1; p=reject"',
    # quar.test: SPF hard fail for everyone, DMARC p=quarantine
    'quar.test. 60 IN TXT "v=spf1 -all"',
    '_dmarc.quar.test. 60 IN TXT "v=DMARC1; p=quarantine"',
    # soft.test: SPF softfail, DMARC p=none (monitoring only)
    'soft.test. 60 IN TXT "v=spf1 ~all"',
    '_dmarc.soft.test. 60 IN TXT "v=DMARC1; p=none"',
    # third.test: signs with its own key, no policy (a mailing service's domain)
    f"sel._domainkey.third.test. 60 IN TXT {_txt(f'v=DKIM1; k=rsa; p={PUBLIC}')}",
    'third.test. 60 IN TXT "v=spf1 ip4:198.51.100.0/24 -all"',
    # our own domain publishes a strict policy: forged From gets caught by DMARC
    'example.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
    '_dmarc.example.test. 60 IN TXT "v=DMARC1; p=reject"',
    # nospf.test: the name exists, nothing published
    "nospf.test. 60 IN A 192.0.2.99",
]) + "\n"


@pytest.fixture
def dns_peer(dns_peers: StartDnsPeer) -> DnsPeer:
    return dns_peers(ZONE)


@pytest.fixture
def app_settings(settings: Settings, nats_url: str, dns_peer: DnsPeer) -> Settings:
    return settings.model_copy(update={
        "nats_url": nats_url, "outbound_nameserver": f"{dns_peer.host}:{dns_peer.port}",
        "inbound_auth_checks": True})


@pytest.fixture
async def delivery(app_settings: Settings, metadata: MetadataApp
                   ) -> AsyncIterator[DeliveryApp]:
    app = DeliveryApp(app_settings.model_copy(update={"metadata_addr": metadata.grpc_addr}))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def alice(metadata_client: MetadataClient) -> common_pb2.User:
    return await metadata_client.create_user("alice@example.test", PASSWORD)


def message(from_: str, subject: str, *, date: bool = True, sign_as: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = from_
    msg["To"] = "alice@example.test"
    msg["Subject"] = subject
    if date:
        msg["Date"] = "Tue, 10 May 2005 11:26:39 -0600"
    msg["Message-ID"] = f"<{abs(hash(subject))}@x.test>"
    msg.set_content(f"Body of {subject}.\n")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    if sign_as:
        raw = dkim.sign(raw, b"sel", sign_as.encode(), PEM, linesep=b"\r\n",
                        include_headers=[b"from", b"to", b"subject", b"date"]) + raw
    return raw


async def deliver(js: JetStreamContext, client: MetadataClient, user: common_pb2.User,
                  raw: bytes, *, ip: str, mail_from: str, queue_id: str
                  ) -> common_pb2.Message:
    stored = await client.put_blob(raw)
    job = delivery_pb2.InboundJob(queue_id=queue_id, blob_key=stored.blob_key,
                                  size=len(raw), mail_from=mail_from,
                                  rcpt_to=["alice@example.test"], client_address=ip,
                                  helo="client.test")
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), queue_id)

    async def filed() -> common_pb2.Message | None:
        for folder in ("inbox", "spam"):
            page = await client.list_messages(user.user_id, folder, page_size=200)
            for summary in page.messages:
                found = await client.get_message(user.user_id, summary.email_id)
                if found.message_id == _message_id(raw):
                    return found
        return None

    return await eventually(filed, f"job {queue_id} filed")


def _message_id(raw: bytes) -> str:
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode().strip("<>")
    return ""


async def folder_role(client: MetadataClient, user: common_pb2.User, folder_id: str) -> str:
    for f in await client.list_folders(user.user_id):
        if f.folder_id == folder_id:
            return common_pb2.FolderRole.Name(f.role).removeprefix("FOLDER_ROLE_").lower()
    return "?"


def results(found: common_pb2.Message) -> str:
    return found.checks.authentication_results.replace("\r\n\t", " ")


async def test_signed_aligned_mail_passes_spf_dkim_dmarc_and_lands_in_the_inbox(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("Bank <news@good.test>", "monthly statement", sign_as="good.test")
    found = await deliver(js, metadata_client, alice, raw, ip=GOOD_IP,
                          mail_from="bounce@good.test", queue_id="q-pass")
    assert results(found).startswith("mx.example.test; ")
    assert "spf=pass" in results(found)
    assert "dkim=pass header.d=good.test header.s=sel" in results(found)
    assert "dmarc=pass (p=reject) header.from=good.test" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "inbox"
    assert [r.name for r in found.checks.spam.rules] == ["dmarc_pass"]
    assert found.checks.reason == ""


async def test_dmarc_reject_failure_is_filed_in_spam_with_the_reason(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("Bank <news@good.test>", "urgent: confirm")
    found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                          mail_from="bounce@good.test", queue_id="q-reject")
    assert "spf=fail" in results(found) and "dkim=none" in results(found)
    assert "dmarc=fail (p=reject) header.from=good.test" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "spam"
    assert found.checks.reason.startswith("DMARC policy p=reject of good.test")


async def test_dkim_signature_of_another_domain_is_not_aligned(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    # Signed by third.test (passes) but From good.test: DMARC needs the From's domain.
    raw = message("Bank <news@good.test>", "sent through a mailer", sign_as="third.test")
    found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                          mail_from="bounce@third.test", queue_id="q-misaligned")
    assert "spf=pass (sender SPF authorized) smtp.mailfrom=bounce@third.test" in results(
        found)
    assert "dkim=pass header.d=third.test" in results(found)
    assert "dmarc=fail (p=reject)" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "spam"


async def test_tampered_signature_fails_dkim(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("Bank <news@good.test>", "tampered", sign_as="good.test")
    raw = raw.replace(b"Body of tampered", b"Body of TAMPERED")
    found = await deliver(js, metadata_client, alice, raw, ip=GOOD_IP,
                          mail_from="bounce@good.test", queue_id="q-tampered")
    assert "dkim=fail" in results(found)
    # SPF still passes aligned: DMARC needs only one of the two.
    assert "dmarc=pass" in results(found)
    assert "dkim_invalid" in [r.name for r in found.checks.spam.rules]


async def test_dmarc_quarantine_goes_to_spam(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("Shop <shop@quar.test>", "your order")
    found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                          mail_from="shop@quar.test", queue_id="q-quarantine")
    assert "spf=fail" in results(found)
    assert "dmarc=fail (p=quarantine) header.from=quar.test" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "spam"
    assert "p=quarantine" in found.checks.reason


async def test_spf_softfail_with_dmarc_none_stays_in_the_inbox_with_its_score(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("Club <club@soft.test>", "meeting notes", date=False)
    found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                          mail_from="club@soft.test", queue_id="q-soft")
    assert "spf=softfail" in results(found)
    assert "dmarc=fail (p=none)" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "inbox"
    rules = {r.name: r.score for r in found.checks.spam.rules}
    assert rules == {"spf_softfail": 1.5, "dmarc_fail": 2.0, "missing_date": 0.5}
    assert found.checks.spam.score == 4.0 and found.checks.spam.threshold == 5.0


async def test_domain_without_records_gets_spf_none_and_dmarc_none(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("Someone <me@nospf.test>", "hello there")
    found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                          mail_from="me@nospf.test", queue_id="q-none")
    assert "spf=none" in results(found) and "dkim=none" in results(found)
    assert "dmarc=none header.from=nospf.test" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "inbox"
    assert list(found.checks.spam.rules) == []


async def test_forged_from_of_our_own_domain_from_outside_goes_to_spam(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    raw = message("IT desk <it@example.test>", "reset your password")
    found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                          mail_from="x@nospf.test", queue_id="q-forged")
    assert "dmarc=fail (p=reject) header.from=example.test" in results(found)
    assert await folder_role(metadata_client, alice, found.folder_id) == "spam"
    assert "local_domain_forged" in [r.name for r in found.checks.spam.rules]


async def test_moving_to_spam_blocks_the_sender_and_out_of_spam_allows_it(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    first = await deliver(js, metadata_client, alice,
                          message("Pest <pest@nospf.test>", "buy now"), ip=OTHER_IP,
                          mail_from="pest@nospf.test", queue_id="q-list-1")
    await metadata_client.update_message(alice.user_id, first.email_id, folder_id="spam")
    [entry] = await metadata_client.sender_lists(alice.user_id)
    assert (entry.sender, entry.allow, entry.source) == ("pest@nospf.test", False,
                                                         "feedback")
    second = await deliver(js, metadata_client, alice,
                           message("Pest <pest@nospf.test>", "buy again"), ip=OTHER_IP,
                           mail_from="pest@nospf.test", queue_id="q-list-2")
    assert await folder_role(metadata_client, alice, second.folder_id) == "spam"
    assert "sender_block_list" in [r.name for r in second.checks.spam.rules]
    assert second.checks.reason.startswith("spam score 100")

    await metadata_client.update_message(alice.user_id, second.email_id, folder_id="inbox")
    [entry] = await metadata_client.sender_lists(alice.user_id)
    assert entry.allow
    third = await deliver(js, metadata_client, alice,
                          message("Pest <pest@nospf.test>", "BUY NOW WHILE STOCKS LAST"),
                          ip=OTHER_IP, mail_from="pest@nospf.test", queue_id="q-list-3")
    assert await folder_role(metadata_client, alice, third.folder_id) == "inbox"
    assert third.checks.spam.score < 0


async def test_corpus_dkim_samples_are_checked_without_crashing(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        delivery: DeliveryApp) -> None:
    # Their keys are not published here: fail/permerror/none, never a crash or a loss.
    samples = sorted((CORPUS / "mimekit" / "dkim").iterdir())
    assert samples
    for n, path in enumerate(samples):
        raw = _crlf(path.read_bytes()).replace(
            b"Message-ID:", f"X-Original-Message-ID-{n}:".encode(), 1)
        raw = f"Message-ID: <corpus-dkim-{n}@x.test>\r\n".encode() + raw
        found = await deliver(js, metadata_client, alice, raw, ip=OTHER_IP,
                              mail_from="peer@remote.test", queue_id=f"q-corpus-{n}")
        assert results(found).startswith("mx.example.test; spf=none")
        assert "dkim=pass" not in results(found), path.name


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_every_corpus_message_is_checked_without_raising(dns_peer: DnsPeer) -> None:
    # dkimpy refuses some header sections outright: that is a permerror, not a crash.
    checker = AuthChecker(make_sync_resolver(f"{dns_peer.host}:{dns_peer.port}"))
    seen: set[str] = set()
    for name, data in corpus_messages():
        found = checker.check(smtp_wire_form(data), OTHER_IP, "peer@remote.test", "peer.test")
        assert found.spf == "none", name
        seen.update(d.result for d in found.dkim)
    assert "permerror" in seen
