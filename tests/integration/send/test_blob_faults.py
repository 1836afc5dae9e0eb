"""An unwritable blob store: SMTP answers 452 4.3.1, HTTP 503 with Retry-After, nothing
is queued or filed that points at a blob that was never written, and once the store
is back the same message goes through.

Tests run as root, where file modes stop nothing: the blob directory is replaced by a
regular file, so every write under it fails with ENOTDIR (the blob contract's trick).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from gateway.app import GatewayApp
from mailgrid.settings import Settings
from metadata_svc.app import MetadataApp
from tests.integration.send.kit import (
    Account,
    assert_problem,
    gateway_settings,
    messages,
    wait_messages,
)
from tests.integration.test_smtp_mx import QUEUED, R, Smtp, inbound_jobs

S452_STORAGE_FULL = R(452, "4.3.1 Storage full, try again later")
LARGE = b"Subject: nowhere\r\n\r\n" + b"large body line\r\n" * 20


@contextmanager
def unwritable_blob_store(settings: Settings) -> Iterator[None]:
    root = Path(settings.blob_dir)
    away = root.with_name(root.name + ".away")
    root.rename(away)
    root.write_bytes(b"")
    try:
        yield
    finally:
        root.unlink()
        away.rename(root)


async def test_an_unwritable_blob_store_is_452_4_3_1_at_smtp_for_a_large_message(
        app_settings: Settings, metadata: MetadataApp, delivery: DeliveryApp, bob: Account,
        js: JetStreamContext) -> None:
    # Past the inline limit the bytes go to the blob store before the job is published.
    limited = gateway_settings(app_settings, metadata, delivery).model_copy(
        update={"inbound_inline_max_bytes": 64})
    gateway = GatewayApp(limited)
    await gateway.start()
    try:
        client, _ = await Smtp.connect(gateway.smtp_addr)
        await client.envelope("bob@example.test")
        with unwritable_blob_store(app_settings):
            assert await client.data(LARGE) == S452_STORAGE_FULL
            assert await inbound_jobs(js) == []
        await client.envelope("bob@example.test")
        reply = await client.data(LARGE)
        assert reply.code == 250 and QUEUED.match(reply.text)
        await client.close()
    finally:
        await gateway.stop()


async def test_a_small_message_accepted_while_the_blob_store_is_unwritable_is_filed_after(
        gateway: GatewayApp, http: httpx.AsyncClient, app_settings: Settings, bob: Account
        ) -> None:
    # A small message travels in its job (durable in JetStream before the 250); filing
    # it waits, retrying, until the blob store takes its bytes again. Nothing is lost.
    client, _ = await Smtp.connect(gateway.smtp_addr)
    await client.envelope("bob@example.test")
    with unwritable_blob_store(app_settings):
        reply = await client.data(b"Subject: held\r\n\r\nbody\r\n")
        assert reply.code == 250 and QUEUED.match(reply.text)
        await asyncio.sleep(0.5)  # the worker tries, and fails, meanwhile
        assert await messages(http, bob, "inbox") == []
    await client.close()
    (filed,) = await wait_messages(http, bob, "inbox", 1)
    assert filed["subject"] == "held"


async def test_an_unwritable_blob_store_is_503_with_retry_after_and_nothing_is_filed(
        http: httpx.AsyncClient, app_settings: Settings, alice: Account,
        bob: Account) -> None:
    body = {"to": ["bob@example.test"], "subject": "stuck", "text": "body"}
    with unwritable_blob_store(app_settings):
        reply = await http.post("/v1/messages", json=body, headers=alice.headers)
        assert_problem(reply, 503)
        assert int(reply.headers["retry-after"]) > 0
    assert await messages(http, alice, "sent") == []
    assert await messages(http, bob, "inbox") == []
    again = await http.post("/v1/messages", json=body, headers=alice.headers)
    assert again.status_code == 202, again.text
    await wait_messages(http, bob, "inbox", 1)
