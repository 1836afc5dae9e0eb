"""An unwritable blob store: SMTP answers 452 4.3.1, HTTP 503 with Retry-After, nothing
is queued or filed that points at a blob that was never written, and once the store
is back the same message goes through.

Tests run as root, where file modes stop nothing: the blob directory is replaced by a
regular file, so every write under it fails with ENOTDIR (the blob contract's trick).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from nats.js import JetStreamContext

from gateway.app import GatewayApp
from mailgrid.settings import Settings
from tests.integration.send.kit import Account, assert_problem, messages, wait_messages
from tests.integration.test_smtp_mx import QUEUED, R, Smtp, inbound_jobs

S452_STORAGE_FULL = R(452, "4.3.1 Storage full, try again later")


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


async def test_an_unwritable_blob_store_is_452_4_3_1_at_smtp_and_nothing_is_queued(
        gateway: GatewayApp, app_settings: Settings, bob: Account,
        js: JetStreamContext) -> None:
    client, _ = await Smtp.connect(gateway.smtp_addr)
    await client.envelope("bob@example.test")
    with unwritable_blob_store(app_settings):
        assert await client.data(b"Subject: nowhere\r\n\r\nbody\r\n") == S452_STORAGE_FULL
        assert await inbound_jobs(js) == []
    await client.envelope("bob@example.test")
    reply = await client.data(b"Subject: nowhere\r\n\r\nbody\r\n")
    assert reply.code == 250 and QUEUED.match(reply.text)
    await client.close()


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
