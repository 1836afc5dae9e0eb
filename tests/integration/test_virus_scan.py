"""Virus scanning of inbound mail by a real clamd: infected mail is quarantined, the
recipient is told, clean mail is delivered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import EmailMessage

import pytest
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from delivery_svc.checks.virus import ClamdScanner
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import Unavailable
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2
from metadata_svc.app import MetadataApp
from tests.integration.test_inbound_worker import PASSWORD, eventually, js
from tests.peers.clamd import EICAR, Clamd, clamd

__all__ = ["clamd", "js"]  # fixtures


@pytest.fixture
async def delivery(app_settings: Settings, metadata: MetadataApp, clamd: Clamd
                   ) -> AsyncIterator[DeliveryApp]:
    app = DeliveryApp(app_settings.model_copy(update={
        "metadata_addr": metadata.grpc_addr, "clamd_address": str(clamd.socket),
        # Jobs with an unresolvable sender domain: no DNS needed for this test.
        "inbound_auth_checks": False}))
    await app.start()
    yield app
    await app.stop()


def message(subject: str, attachment: bytes | None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@remote.example>"
    msg["To"] = "alice@example.test"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 10 May 2005 11:26:39 -0600"
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@remote.example>"
    msg.set_content("See the attachment.\n")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename="tool.com")
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def publish(js: JetStreamContext, client: MetadataClient, raw: bytes,
                  queue_id: str) -> None:
    stored = await client.put_blob(raw)
    job = delivery_pb2.InboundJob(queue_id=queue_id, blob_key=stored.blob_key,
                                  size=len(raw), mail_from="sender@remote.example",
                                  rcpt_to=["alice@example.test"],
                                  client_address="192.0.2.1", helo="remote.example")
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), queue_id)


async def test_clamd_scanner_names_the_virus_and_passes_clean_data(clamd: Clamd) -> None:
    scanner = ClamdScanner(str(clamd.socket))
    assert await scanner.scan(message("infected", EICAR)) == "Mailgrid.Test.EICAR.UNOFFICIAL"
    assert await scanner.scan(message("clean", b"just bytes")) == ""


async def test_unreachable_clamd_is_unavailable_not_clean() -> None:
    with pytest.raises(Unavailable):
        await ClamdScanner("/tmp/no-such-clamd.sock").scan(b"data")


async def test_infected_mail_is_quarantined_and_the_recipient_told(
        js: JetStreamContext, metadata_client: MetadataClient,
        delivery: DeliveryApp) -> None:
    alice = await metadata_client.create_user("alice@example.test", PASSWORD)
    await publish(js, metadata_client, message("infected", EICAR), "virus-1")
    await publish(js, metadata_client, message("clean", b"harmless"), "virus-2")

    async def listing(folder: str) -> list[common_pb2.MessageSummary] | None:
        page = await metadata_client.list_messages(alice.user_id, folder)
        return list(page.messages) or None

    [quarantined] = await eventually(lambda: listing("spam"), "the infected message in Spam")
    found = await metadata_client.get_message(alice.user_id, quarantined.email_id)
    assert found.subject == "infected"
    assert found.checks.virus == "Mailgrid.Test.EICAR.UNOFFICIAL"
    assert found.checks.reason == "virus Mailgrid.Test.EICAR.UNOFFICIAL found: quarantined"

    async def two_in_inbox() -> list[common_pb2.MessageSummary] | None:
        found = await listing("inbox")
        return found if found and len(found) == 2 else None

    inbox = await eventually(two_in_inbox, "the notice and the clean message in the inbox")
    assert sorted(m.subject for m in inbox) == [
        "Quarantined: a message to you contained a virus", "clean"]
    notice = next(m for m in inbox if m.subject.startswith("Quarantined"))
    text = (await metadata_client.get_message(alice.user_id, notice.email_id)).text
    assert "Mailgrid.Test.EICAR.UNOFFICIAL" in text and "Subject: infected" in text
