"""search_svc in-process: real nats-server, real metadata_svc, real gRPC sockets.

Each change is followed by reading its event's stream sequence (an ordered consumer on
mail.events.*, as a live client would) and searching with min_applied_seq, so nothing
here sleeps or polls the index.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from nats.js import JetStreamContext

from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import InvalidArgument, NotFound, Unavailable
from mailgrid.search_client import SearchClient
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, metadata_pb2, search_pb2
from metadata_svc.app import MetadataApp
from search_svc import indexer
from search_svc.app import SearchApp, index_path
from search_svc.pacing import CpuMeter, IndexPacer
from search_svc.ports import DeleteUser
from tests.unit.test_search_pacing import Machine


@dataclass
class Events:
    """The EVENTS stream as a client follows it."""

    sub: JetStreamContext.PushSubscription

    async def next_seq(self) -> int:
        msg = await self.sub.next_msg(timeout=10)
        return int(msg.metadata.sequence.stream)

    async def last_seq(self, count: int) -> int:
        """The sequence of the last of the next ``count`` events."""
        seq = 0
        for _ in range(count):
            seq = await self.next_seq()
        return seq


@pytest.fixture
def search_settings(app_settings: Settings, metadata: MetadataApp) -> Settings:
    return app_settings.model_copy(update={"metadata_addr": metadata.grpc_addr,
                                           "search_wait_timeout": 5.0})


@pytest.fixture
async def search_app(search_settings: Settings) -> AsyncIterator[SearchApp]:
    app = SearchApp(search_settings)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def search(search_app: SearchApp) -> AsyncIterator[SearchClient]:
    async with SearchClient(search_app.grpc_addr) as client:
        yield client


@pytest.fixture
async def events(nats_url: str) -> AsyncIterator[Events]:
    nc = await bus.connect(nats_url, "test-events")
    sub = await nc.jetstream().subscribe(f"{bus.EVENTS_PREFIX}.*", ordered_consumer=True,
                                         deliver_policy=None)
    yield Events(sub)
    await nc.close()


@pytest.fixture
async def alice(metadata_client: MetadataClient) -> common_pb2.User:
    return await metadata_client.create_user("alice@example.test", "pw-alice")


@pytest.fixture
async def bob(metadata_client: MetadataClient) -> common_pb2.User:
    return await metadata_client.create_user("bob@example.test", "pw-bob")


async def deliver(md: MetadataClient, user: common_pb2.User, key: str, subject: str,
                  text: str = "", html: str = "", filename: str = "",
                  folder: str = "") -> str:
    put = await md.put_blob(f"Subject: {subject}\r\n\r\n{text}\r\n".encode())
    request = metadata_pb2.StoreDeliveryRequest(
        user_id=user.user_id, delivery_key=key, blob_key=put.blob_key, size=put.size,
        folder_id=folder)
    parsed = request.parsed
    parsed.subject, parsed.text, parsed.html, parsed.preview = subject, text, html, text[:50]
    getattr(parsed, "from").CopyFrom(common_pb2.EmailAddress(name="Peer Gynt",
                                                              email="peer@remote.test"))
    parsed.to.add(name="", email=user.address)
    if filename:
        blob = await md.put_blob(b"attachment bytes")
        parsed.attachments.add(filename=filename, size=blob.size, blob_key=blob.blob_key,
                               content_type="application/pdf")
    return (await md.store_delivery(request)).email_id


async def ids(search: SearchClient, user: common_pb2.User, q: str, seq: int = 0) -> list[str]:
    reply = await search.search(search_pb2.SearchRequest(
        user_id=user.user_id, query=q, min_applied_seq=seq, page_size=100))
    assert reply.applied_seq >= seq
    return [r.message.email_id for r in reply.results]


async def test_delivered_mail_is_found_once_its_event_is_applied(
        search: SearchClient, metadata_client: MetadataClient, events: Events,
        alice: common_pb2.User) -> None:
    email_id = await deliver(metadata_client, alice, "k1", "Budget for 2025",
                             html="<p>The <b>invoice</b> is attached</p>",
                             filename="invoice-march.pdf")
    seq = await events.next_seq()
    assert await ids(search, alice, "invoice", seq) == [email_id]  # from the HTML body
    assert await ids(search, alice, "filename:march has:attachment from:peer", seq) \
        == [email_id]
    reply = await search.search(search_pb2.SearchRequest(user_id=alice.user_id,
                                                         query="invoice"))
    (result,) = reply.results
    assert result.message.subject == "Budget for 2025"
    assert result.snippet.text == "The invoice is attached"
    (mark,) = result.snippet.highlights
    assert result.snippet.text[mark.start:mark.end] == "invoice"
    assert reply.total_estimate == 1 and not reply.truncated


async def test_the_indexer_keeps_indexing_after_idle_fetches(
        search: SearchClient, metadata_client: MetadataClient, events: Events,
        alice: common_pb2.User) -> None:
    first = await deliver(metadata_client, alice, "busy", "before a quiet spell")
    assert await ids(search, alice, "before", await events.next_seq()) == [first]
    # Fetches come back empty while nothing happens; the indexer must survive them.
    await asyncio.sleep(indexer.FETCH_TIMEOUT * 4)
    email_id = await deliver(metadata_client, alice, "idle", "after a quiet spell")
    assert await ids(search, alice, "after", await events.next_seq()) == [email_id]


async def test_a_busy_machine_defers_indexing_but_never_a_search_that_waits(
        search_app: SearchApp, search: SearchClient, metadata_client: MetadataClient,
        events: Events, alice: common_pb2.User) -> None:
    # A machine with no CPU to spare, and a 3 s bound on how long indexing waits for it.
    assert search_app.indexer is not None and search_app.indexer.pacer is not None
    assert search_app.indexer.pacer.max_delay == search_app.settings.search_index_max_delay
    search_app.indexer.pacer = IndexPacer(3.0, CpuMeter(Machine(idle_share=0.0).read,
                                                        own=lambda: 0.0), interval=0.05)
    held = await deliver(metadata_client, alice, "held", "held back while busy")
    seq = await events.next_seq()
    await asyncio.sleep(0.5)
    assert await ids(search, alice, "held") == []  # filed, not indexed yet
    started = time.monotonic()
    assert await ids(search, alice, "held", seq) == [held]  # read-your-writes: at once
    assert time.monotonic() - started < 2.0
    # Nobody waiting: indexed by itself once its event is 3 s old.
    later = await deliver(metadata_client, alice, "later", "caught up later")
    await events.next_seq()
    started = time.monotonic()
    while not await ids(search, alice, "later"):
        assert time.monotonic() - started < 10, "never indexed"
        await asyncio.sleep(0.1)
    assert time.monotonic() - started > 2.0
    assert await ids(search, alice, "later") == [later]


async def test_flags_moves_and_deletes_keep_the_index_in_step(
        search: SearchClient, metadata_client: MetadataClient, events: Events,
        alice: common_pb2.User) -> None:
    md = metadata_client
    email_id = await deliver(md, alice, "k1", "quarterly numbers")
    seq = await events.next_seq()
    assert await ids(search, alice, "quarterly is:unread in:inbox", seq) == [email_id]

    await md.update_message(alice.user_id, email_id, is_read=True, is_starred=True)
    seq = await events.next_seq()
    assert await ids(search, alice, "quarterly is:read is:starred", seq) == [email_id]
    assert await ids(search, alice, "is:unread", seq) == []

    await md.update_message(alice.user_id, email_id, folder_id="archive")
    seq = await events.next_seq()
    assert await ids(search, alice, "in:archive quarterly", seq) == [email_id]
    assert await ids(search, alice, "in:inbox", seq) == []

    await md.delete_message(alice.user_id, email_id)  # to Trash: hidden unless asked for
    seq = await events.next_seq()
    assert await ids(search, alice, "quarterly", seq) == []
    assert await ids(search, alice, "in:trash quarterly", seq) == [email_id]
    assert await ids(search, alice, "in:anywhere quarterly", seq) == [email_id]

    await md.delete_message(alice.user_id, email_id)  # from Trash: gone for good
    seq = await events.next_seq()
    assert await ids(search, alice, "in:anywhere quarterly", seq) == []


async def test_users_never_find_each_others_mail(
        search: SearchClient, metadata_client: MetadataClient, events: Events,
        alice: common_pb2.User, bob: common_pb2.User) -> None:
    mine = await deliver(metadata_client, alice, "k1", "secret plans", "top secret")
    seq = await events.next_seq()
    assert await ids(search, alice, "secret", seq) == [mine]
    for q in ("secret", "", "in:anywhere", "from:peer", "-nothing"):
        assert await ids(search, bob, q, seq) == [], q


async def test_a_malformed_query_is_invalid_argument_with_its_position(
        search: SearchClient, alice: common_pb2.User) -> None:
    with pytest.raises(InvalidArgument, match=r"unterminated quote at position 5$"):
        await search.search(search_pb2.SearchRequest(user_id=alice.user_id,
                                                     query='from:"bob'))
    with pytest.raises(InvalidArgument, match=r"no folder named 'Receipts' at position 3$"):
        await search.search(search_pb2.SearchRequest(user_id=alice.user_id,
                                                     query="in:Receipts"))


async def test_an_unknown_user_is_not_found(search: SearchClient) -> None:
    with pytest.raises(NotFound):
        await search.search(search_pb2.SearchRequest(user_id="nobody", query="x"))


async def test_a_sequence_never_reached_is_unavailable(
        search_settings: Settings, alice: common_pb2.User) -> None:
    app = SearchApp(search_settings.model_copy(update={"search_wait_timeout": 0.2}))
    await app.start()
    try:
        async with SearchClient(app.grpc_addr) as client:
            with pytest.raises(Unavailable, match="not yet 999999"):
                await client.search(search_pb2.SearchRequest(
                    user_id=alice.user_id, query="x", min_applied_seq=999_999))
    finally:
        await app.stop()


async def test_the_index_catches_up_on_changes_made_while_it_was_down(
        search_settings: Settings, metadata_client: MetadataClient, events: Events,
        alice: common_pb2.User) -> None:
    app = SearchApp(search_settings)
    await app.start()
    first = await deliver(metadata_client, alice, "k1", "before the outage")
    seq = await events.next_seq()
    async with SearchClient(app.grpc_addr) as client:
        assert await ids(client, alice, "outage", seq) == [first]
    await app.stop()

    second = await deliver(metadata_client, alice, "k2", "during the outage")
    await metadata_client.update_message(alice.user_id, first, is_starred=True)
    seq = await events.last_seq(2)

    app = SearchApp(search_settings)
    await app.start()
    try:
        async with SearchClient(app.grpc_addr) as client:
            assert set(await ids(client, alice, "outage", seq)) == {first, second}
            assert await ids(client, alice, "is:starred", seq) == [first]
    finally:
        await app.stop()


async def test_a_lost_index_is_rebuilt_from_the_event_stream(
        search_settings: Settings, metadata_client: MetadataClient, events: Events,
        alice: common_pb2.User) -> None:
    app = SearchApp(search_settings)
    await app.start()
    email_id = await deliver(metadata_client, alice, "k1", "phoenix")
    seq = await events.next_seq()
    async with SearchClient(app.grpc_addr) as client:
        assert await ids(client, alice, "phoenix", seq) == [email_id]
    await app.stop()
    shutil.rmtree(index_path(search_settings))

    app = SearchApp(search_settings)
    await app.start()
    try:
        async with SearchClient(app.grpc_addr) as client:
            assert await ids(client, alice, "phoenix", seq) == [email_id]
    finally:
        await app.stop()


async def test_reindex_rebuilds_from_the_mailbox_store_with_progress(
        search_app: SearchApp, search: SearchClient, metadata_client: MetadataClient,
        events: Events, alice: common_pb2.User, bob: common_pb2.User) -> None:
    a1 = await deliver(metadata_client, alice, "a1", "alpha one")
    a2 = await deliver(metadata_client, alice, "a2", "alpha two", folder="archive")
    b1 = await deliver(metadata_client, bob, "b1", "alpha bob")
    seq = await events.last_seq(3)
    assert len(await ids(search, alice, "alpha", seq)) == 2
    assert search_app.index is not None
    await search_app.index.apply([DeleteUser(alice.user_id), DeleteUser(bob.user_id)], seq)
    assert await ids(search, alice, "alpha") == []

    one = [p async for p in search.reindex(search_pb2.ReindexRequest(address=alice.address))]
    assert (one[-1].users_done, one[-1].users_total) == (1, 1)
    assert one[-1].messages_done == one[-1].messages_total == 2
    assert set(await ids(search, alice, "alpha")) == {a1, a2}
    assert await ids(search, bob, "alpha") == []

    every = [p async for p in search.reindex(search_pb2.ReindexRequest())]
    assert (every[-1].users_done, every[-1].messages_done) == (2, 3)
    assert await ids(search, bob, "alpha") == [b1]
    status = await search.status()
    assert status.backend == "embedded" and status.documents == 3
    assert status.applied_seq >= seq


async def test_reindexing_an_unknown_address_is_not_found(search: SearchClient) -> None:
    with pytest.raises(NotFound):
        async for _ in search.reindex(search_pb2.ReindexRequest(address="who@example.test")):
            pass


async def test_list_users_pages_through_every_user_in_id_order(
        metadata_client: MetadataClient) -> None:
    made = [await metadata_client.create_user(f"u{n}@example.test", "pw") for n in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await metadata_client.list_users(page_size=2, page_token=token)
        seen.extend(u.user_id for u in page.users)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(u.user_id for u in made)
    with pytest.raises(InvalidArgument):
        await metadata_client.list_users(page_size=5000)
