"""metadata_svc over a real gRPC socket, with a real nats-server for its events."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.js.errors import FetchTimeoutError

from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from mailgrid.filing import parse_limited
from mailgrid.grpcutil import CHUNK_SIZE, channel
from mailgrid.natsd import NatsServer
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, events_pb2, metadata_pb2, metadata_pb2_grpc
from metadata_svc.app import MetadataApp
from metadata_svc.ports import OutboxEvent
from tests.integration.test_bus import stored

MiB = 1024 * 1024


@pytest.fixture
def app(metadata: MetadataApp) -> MetadataApp:
    return metadata


@pytest.fixture
def client(metadata_client: MetadataClient) -> MetadataClient:
    return metadata_client


@pytest.fixture
async def alice(client: MetadataClient) -> common_pb2.User:
    return await client.create_user("alice@example.test", "alice-pw")


@pytest.fixture
async def bob(client: MetadataClient) -> common_pb2.User:
    return await client.create_user("bob@example.test", "bob-pw")


async def deliver(client: MetadataClient, user: common_pb2.User, key: str, *,
                  raw: bytes | None = None, subject: str = "hi", message_id: str = "",
                  attachments: tuple[bytes, ...] = ()) -> str:
    """Puts the raw message (and attachments) as blobs and files the delivery."""
    raw = raw if raw is not None else f"Subject: {subject}\r\n\r\nbody of {key}\r\n".encode()
    put = await client.put_blob(raw)
    request = metadata_pb2.StoreDeliveryRequest(
        user_id=user.user_id, delivery_key=key, blob_key=put.blob_key, size=put.size)
    request.parsed.subject, request.parsed.message_id = subject, message_id
    getattr(request.parsed, "from").email = "ann@x.org"
    for index, data in enumerate(attachments):
        blob = await client.put_blob(data)
        request.parsed.attachments.add(filename=f"file{index}.bin", size=blob.size,
                                       content_type="application/octet-stream",
                                       blob_key=blob.blob_key)
    reply = await client.store_delivery(request)
    return reply.email_id


async def counts(client: MetadataClient, user: common_pb2.User) -> dict[str, tuple[int, int]]:
    return {f.name: (f.total, f.unread) for f in await client.list_folders(user.user_id)}


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


# --- the service -----------------------------------------------------------------------

async def test_health_is_serving_and_reflection_lists_the_services(app: MetadataApp) -> None:
    async with channel(app.grpc_addr) as chan:
        health = health_pb2_grpc.HealthStub(chan)
        for service in ("", "mailgrid.v1.MetadataService", "mailgrid.v1.BlobService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(chan)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in replies for s in r.list_services_response.service}
    assert {"mailgrid.v1.MetadataService", "mailgrid.v1.BlobService",
            "grpc.health.v1.Health"} <= names


async def test_user_is_created_found_and_authenticated(
        client: MetadataClient, alice: common_pb2.User) -> None:
    assert await client.get_user(address="ALICE@example.test") == alice
    assert await client.get_user(user_id=alice.user_id) == alice
    assert await client.authenticate("alice@example.test", "alice-pw") == alice
    with pytest.raises(Unauthenticated) as wrong:
        await client.authenticate("alice@example.test", "nope")
    with pytest.raises(Unauthenticated) as unknown:
        await client.authenticate("nobody@example.test", "alice-pw")
    assert wrong.value.detail == unknown.value.detail
    with pytest.raises(AlreadyExists):
        await client.create_user("Alice@Example.Test", "again")
    with pytest.raises(NotFound):
        await client.get_user(address="nobody@example.test")
    assert [f.name for f in await client.list_folders(alice.user_id)] == [
        "Inbox", "Sent", "Drafts", "Trash", "Spam", "Archive"]


async def test_delivered_message_is_listed_read_and_its_raw_bytes_stream_back(
        client: MetadataClient, alice: common_pb2.User) -> None:
    raw = b"Subject: big\r\n\r\n" + os.urandom(2 * MiB + 7)
    email_id = await deliver(client, alice, "job-1:alice", raw=raw, subject="big")
    page = await client.list_messages(alice.user_id, "inbox")
    assert [m.email_id for m in page.messages] == [email_id]
    assert page.messages[0].subject == "big" and page.messages[0].size == len(raw)
    message = await client.get_message(alice.user_id, email_id)
    assert getattr(message, "from").email == "ann@x.org"
    chunks = [chunk async for chunk in client.raw_message(alice.user_id, email_id)]
    assert len(chunks) == 3 and all(len(c) <= CHUNK_SIZE for c in chunks)
    assert b"".join(chunks) == raw
    assert await client.get_blob(message.blob_key) == raw


async def test_attachment_downloads_with_its_description(
        client: MetadataClient, alice: common_pb2.User) -> None:
    data = os.urandom(CHUNK_SIZE + 10)
    email_id = await deliver(client, alice, "d1", attachments=(b"tiny", data))
    message = await client.get_message(alice.user_id, email_id)
    second = message.attachments[1]
    described, body = await client.attachment(alice.user_id, email_id, second.attachment_id)
    assert described == second and described.filename == "file1.bin"
    assert await read_all(body) == data
    with pytest.raises(NotFound):
        await client.attachment(alice.user_id, email_id, "no-such-attachment")


async def test_another_user_gets_not_found_and_sees_none_of_the_mail(
        client: MetadataClient, alice: common_pb2.User, bob: common_pb2.User) -> None:
    email_id = await deliver(client, alice, "d1", attachments=(b"secret",))
    attachment_id = (await client.get_message(alice.user_id, email_id)) \
        .attachments[0].attachment_id
    with pytest.raises(NotFound):
        await client.get_message(bob.user_id, email_id)
    with pytest.raises(NotFound):
        await read_all(client.raw_message(bob.user_id, email_id))
    with pytest.raises(NotFound):
        await client.attachment(bob.user_id, email_id, attachment_id)
    with pytest.raises(NotFound):
        await client.update_message(bob.user_id, email_id, is_read=True)
    with pytest.raises(NotFound):
        await client.delete_message(bob.user_id, email_id, permanent=True)
    for folder in ("inbox", "sent", "drafts", "trash", "spam", "archive"):
        assert list((await client.list_messages(bob.user_id, folder)).messages) == []
    assert not (await client.get_message(alice.user_id, email_id)).is_read


async def test_flags_move_and_delete_keep_counts_right(
        client: MetadataClient, alice: common_pb2.User) -> None:
    first = await deliver(client, alice, "d1")
    second = await deliver(client, alice, "d2")
    assert (await counts(client, alice))["Inbox"] == (2, 2)
    summary = await client.update_message(alice.user_id, first, is_read=True,
                                          is_starred=True)
    assert summary.is_read and summary.is_starred
    assert (await counts(client, alice))["Inbox"] == (2, 1)
    unread = await client.list_messages(alice.user_id, "inbox", unread_only=True)
    assert [m.email_id for m in unread.messages] == [second]
    await client.update_message(alice.user_id, second, folder_id="archive")
    assert (await counts(client, alice))["Archive"] == (1, 1)
    assert await client.delete_message(alice.user_id, first) is False
    now = await counts(client, alice)
    assert now["Inbox"] == (0, 0) and now["Trash"] == (1, 0)
    assert await client.delete_message(alice.user_id, first) is True
    assert (await counts(client, alice))["Trash"] == (0, 0)
    with pytest.raises(NotFound):
        await client.get_message(alice.user_id, first)


async def test_repeated_delivery_returns_the_first_email(
        app: MetadataApp, client: MetadataClient, alice: common_pb2.User) -> None:
    put = await client.put_blob(b"Subject: once\r\n\r\nx\r\n")
    request = metadata_pb2.StoreDeliveryRequest(
        user_id=alice.user_id, delivery_key="Q1:alice", blob_key=put.blob_key, size=put.size)
    first = await client.store_delivery(request)
    again = await client.store_delivery(request)
    assert (again.email_id, again.created, first.created) == (first.email_id, False, True)
    assert (await counts(client, alice))["Inbox"] == (1, 1)
    # Deleted for good and its blob collected: a late redelivery still changes nothing.
    await client.delete_message(alice.user_id, first.email_id, permanent=True)
    await app.blobs.delete(put.blob_key)
    late = await client.store_delivery(request)
    assert (late.email_id, late.created) == (first.email_id, False)
    assert (await counts(client, alice))["Inbox"] == (0, 0)


async def test_store_deliveries_stores_the_carried_bytes_and_answers_each_delivery(
        client: MetadataClient, alice: common_pb2.User, bob: common_pb2.User) -> None:
    raw = b"Subject: batched\r\n\r\nbody\r\n"

    def batched(user: common_pb2.User, key: str, **fields: object
                ) -> metadata_pb2.BatchedDelivery:
        index = fields.pop("blob_index", 0)
        assert isinstance(index, int)
        request = metadata_pb2.StoreDeliveryRequest(user_id=user.user_id, delivery_key=key,
                                                    **fields)  # type: ignore[arg-type]
        request.parsed.subject = "batched"
        return metadata_pb2.BatchedDelivery(request=request, blob_index=index)

    outcomes = await client.store_deliveries(
        [raw], [
            batched(alice, "q1:alice"), batched(bob, "q1:bob"),
            batched(alice, "q2:alice", blob_index=7),            # no such carried blob
            batched(bob, "q3:bob", blob_key="f" * 64, size=1),  # a blob never stored
        ])
    stored_a, stored_b, no_blob, missing = outcomes
    assert isinstance(stored_a, metadata_pb2.StoreDeliveryResponse) and stored_a.created
    assert isinstance(stored_b, metadata_pb2.StoreDeliveryResponse) and stored_b.created
    assert isinstance(no_blob, InvalidArgument) and "blob_index" in no_blob.detail
    assert isinstance(missing, InvalidArgument) and "not in the blob store" in missing.detail
    message = await client.get_message(alice.user_id, stored_a.email_id)
    assert message.size == len(raw)
    assert b"".join([c async for c in client.raw_message(alice.user_id, message.email_id)]) \
        == raw
    # A batch repeated (the worker retrying) stores nothing twice.
    again = await client.store_deliveries([raw], [batched(alice, "q1:alice")])
    assert isinstance(again[0], metadata_pb2.StoreDeliveryResponse)
    assert (again[0].email_id, again[0].created) == (stored_a.email_id, False)


async def test_get_messages_answers_in_order_and_hides_other_users_mail(
        client: MetadataClient, alice: common_pb2.User, bob: common_pb2.User) -> None:
    mine = await deliver(client, alice, "k1", subject="mine")
    theirs = await deliver(client, bob, "k2", subject="theirs")
    found = await client.get_messages([(alice.user_id, mine), (alice.user_id, theirs),
                                       (bob.user_id, theirs)])
    assert [m.subject if m else None for m in found] == ["mine", None, "theirs"]
    assert await client.get_messages([]) == []


async def test_bodies_from_raw_are_parsed_when_read_or_handed_over_raw(
        app: MetadataApp, client: MetadataClient, alice: common_pb2.User,
        bob: common_pb2.User) -> None:
    raw = (b"Subject: parts\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=C3=A9 au lait\r\n"
           b"--b\r\nContent-Type: text/html\r\n\r\n<p>Caf&eacute;</p>\r\n--b--\r\n")
    filed = parse_limited(Settings(), raw).message
    put = await client.put_blob(raw)

    async def file(key: str, from_raw: bool, blob_key: str = put.blob_key) -> str:
        request = metadata_pb2.StoreDeliveryRequest(
            user_id=alice.user_id, delivery_key=key, blob_key=blob_key, size=len(raw))
        request.parsed.CopyFrom(filed)
        if from_raw:
            request.parsed.ClearField("text")
            request.parsed.ClearField("html")
            request.parsed.bodies_from_raw = True
        return (await client.store_delivery(request)).email_id

    kept, derived = await file("kept", False), await file("derived", True)
    for email_id in (kept, derived):  # a reader cannot tell the two apart
        message = await client.get_message(alice.user_id, email_id)
        assert (message.text, message.html) == (filed.text, filed.html)
        assert "Café au lait" in message.text and not message.raw
    as_raw = await client.get_messages([(alice.user_id, kept), (alice.user_id, derived),
                                        (bob.user_id, derived)], bodies_as_raw=True)
    first, second, foreign = as_raw
    assert first is not None and (first.text, first.raw) == (filed.text, b"")
    assert second is not None and (second.text, second.html, second.raw) == ("", "", raw)
    assert foreign is None
    # Its raw message gone (it never is while referenced): the rest is still shown.
    other = await client.put_blob(raw + b"\r\n")
    lost = await file("lost", True, blob_key=other.blob_key)
    assert await app.blobs.delete(other.blob_key)
    message = await client.get_message(alice.user_id, lost)
    assert message.subject == "parts" and message.text == ""
    assert "the raw message is missing from the blob store" in message.parse_problems


async def test_get_messages_replies_stop_under_8_mib_and_the_client_asks_again(
        client: MetadataClient, alice: common_pb2.User) -> None:
    body = ("x" * 1000 + "\r\n") * 1000  # about 1 MB of text per message
    put = await client.put_blob(b"Subject: big\r\n\r\nsee text\r\n")
    ids = []
    for n in range(3):
        request = metadata_pb2.StoreDeliveryRequest(
            user_id=alice.user_id, delivery_key=f"big{n}", blob_key=put.blob_key,
            size=put.size)
        request.parsed.text = body  # the parsed body is what makes the answer big
        ids.append((await client.store_delivery(request)).email_id)
    wanted = [(alice.user_id, email_id) for email_id in ids] * 6  # ~18 MB of answers
    stub = metadata_pb2_grpc.MetadataServiceStub(client._channel)
    reply = await stub.GetMessages(metadata_pb2.GetMessagesRequest(messages=[
        metadata_pb2.GetMessageRequest(user_id=u, email_id=e) for u, e in wanted]))
    found = await client.get_messages(wanted)
    assert [m.email_id for m in found if m] == [e for _, e in wanted]
    assert 0 < len(reply.results) < len(wanted)  # it stopped early
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.GetMessages(metadata_pb2.GetMessagesRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_requests_get_precise_errors(
        client: MetadataClient, alice: common_pb2.User) -> None:
    with pytest.raises(InvalidArgument):
        await client.list_folders("")
    with pytest.raises(InvalidArgument):
        await client.list_messages(alice.user_id, "inbox", page_token="not-a-token")
    with pytest.raises(InvalidArgument):
        await client.list_messages(alice.user_id, "inbox", page_size=500)
    with pytest.raises(NotFound):
        await client.list_messages(alice.user_id, "nowhere")
    with pytest.raises(NotFound):
        await client.get_message(alice.user_id, "not-an-id")
    with pytest.raises(InvalidArgument):
        await client.create_user("not an address", "pw")
    missing_blob = metadata_pb2.StoreDeliveryRequest(
        user_id=alice.user_id, delivery_key="d", blob_key="ab" * 32, size=1)
    with pytest.raises(InvalidArgument):
        await client.store_delivery(missing_blob)
    with pytest.raises(NotFound):
        await client.get_blob("cd" * 32)


# --- events ----------------------------------------------------------------------------

async def next_events(nats_url: str, user_id: str, count: int,
                      wait: float = 30.0) -> list[events_pb2.MailEvent]:
    """The user's first ``count`` events in the EVENTS stream (waits up to ``wait``)."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(bus.events_subject(user_id),
                                                  stream="EVENTS")
        found: list[events_pb2.MailEvent] = []
        deadline = time.monotonic() + wait
        while len(found) < count and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(count - len(found), timeout=1.0)
            except FetchTimeoutError:
                continue
            for msg in msgs:
                found.append(events_pb2.MailEvent.FromString(msg.data))
                await msg.ack()
        return found
    finally:
        await nc.close()


async def test_delivery_publishes_message_added_on_the_users_subject(
        app: MetadataApp, client: MetadataClient, alice: common_pb2.User,
        bob: common_pb2.User, nats_url: str) -> None:
    email_id = await deliver(client, alice, "d1", subject="event me")
    (event,) = await next_events(nats_url, alice.user_id, 1)
    assert event.user_id == alice.user_id
    assert event.message_added.message.email_id == email_id
    assert event.message_added.message.subject == "event me"
    assert [(f.name, f.total, f.unread) for f in event.folders] == [("Inbox", 1, 1)]


async def test_event_made_while_nats_is_down_arrives_after_it_returns(
        app: MetadataApp, client: MetadataClient, alice: common_pb2.User,
        nats_server: NatsServer, nats_url: str) -> None:
    email_id = await deliver(client, alice, "d1")
    assert len(await next_events(nats_url, alice.user_id, 1)) == 1
    nats_server.stop()
    await client.update_message(alice.user_id, email_id, is_starred=True)
    assert len(await app.store.pending_events()) == 1  # kept until NATS takes it
    await nats_server.start()
    events = await next_events(nats_url, alice.user_id, 2)
    assert [e.WhichOneof("kind") for e in events] == ["message_added", "message_updated"]
    assert events[1].message_updated.message.is_starred


async def test_events_wait_in_the_outbox_until_a_nats_is_configured(
        settings: Settings, nats_url: str) -> None:
    without = MetadataApp(settings)  # nats_url empty
    await without.start()
    try:
        async with MetadataClient(without.grpc_addr) as client:
            user = await client.create_user("carol@example.test", "pw")
            email_id = await deliver(client, user, "d1")
        assert len(await without.store.pending_events()) == 1
    finally:
        await without.stop()
    with_nats = MetadataApp(settings.model_copy(update={"nats_url": nats_url}))
    await with_nats.start()
    try:
        (event,) = await next_events(nats_url, user.user_id, 1)
        assert event.message_added.message.email_id == email_id
    finally:
        await with_nats.stop()


async def stored_events(nats_url: str) -> list[tuple[events_pb2.MailEvent, dict[str, str]]]:
    """Every message of the EVENTS stream with its headers, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        return [(events_pb2.MailEvent.FromString(data), headers)
                for _, data, headers in await stored(nc, "EVENTS")]
    finally:
        await nc.close()


async def outbox_of_three(settings: Settings) -> tuple[common_pb2.User, list[OutboxEvent]]:
    """Three deliveries filed with no NATS configured: their events wait in the outbox."""
    without = MetadataApp(settings)
    await without.start()
    try:
        async with MetadataClient(without.grpc_addr) as client:
            user = await client.create_user("carol@example.test", "pw")
            for key in ("d1", "d2", "d3"):
                await deliver(client, user, key)
        return user, await without.store.pending_events()
    finally:
        await without.stop()


async def publish_outbox(settings: Settings, nats_url: str) -> None:
    """Runs metadata_svc with NATS until its outbox is empty."""
    app = MetadataApp(settings.model_copy(update={"nats_url": nats_url}))
    await app.start()
    try:
        for _ in range(600):  # a wait of up to 30 s, not a timing check
            if not await app.store.pending_events():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the outbox did not empty")
    finally:
        await app.stop()


async def test_events_waiting_together_are_stored_as_one_atomic_batch(
        settings: Settings, nats_url: str) -> None:
    user, pending = await outbox_of_three(settings)
    await publish_outbox(settings, nats_url)
    found = await stored_events(nats_url)
    assert [headers["Nats-Msg-Id"] for _, headers in found] == [e.event_id for e in pending]
    assert [event.user_id for event, _ in found] == [user.user_id] * 3
    assert len({headers.get(bus.BATCH_ID) for _, headers in found}) == 1
    assert found[-1][1][bus.BATCH_COMMIT] == "1"


async def test_events_stored_before_their_batch_are_stored_once(
        settings: Settings, nats_url: str) -> None:
    """An earlier try stored some of them but its ack was lost: the stream refuses the
    batch as a whole, and the outbox falls back to one by one, repeats dropped."""
    user, pending = await outbox_of_three(settings)
    nc = await nats.connect(nats_url)
    try:
        for event in pending[:2]:
            await bus.publish(nc.jetstream(), bus.events_subject(user.user_id), event.payload,
                              msg_id=event.event_id)
    finally:
        await nc.close()
    await publish_outbox(settings, nats_url)
    found = await stored_events(nats_url)
    assert [headers["Nats-Msg-Id"] for _, headers in found] == [e.event_id for e in pending]
    assert [event.SerializeToString() for event, _ in found] == [e.payload for e in pending]


# --- blob GC ---------------------------------------------------------------------------

@pytest.fixture
async def gc_app(settings: Settings) -> AsyncIterator[MetadataApp]:
    app = MetadataApp(settings.model_copy(update={"blob_gc_grace": 0.0}))
    await app.start()
    yield app
    await app.stop()


async def test_gc_deletes_a_blob_only_after_its_last_reference_goes(
        gc_app: MetadataApp) -> None:
    shared = b"Subject: to both\r\n\r\nshared raw\r\n"
    async with MetadataClient(gc_app.grpc_addr) as client:
        alice = await client.create_user("alice@example.test", "pw")
        bob = await client.create_user("bob@example.test", "pw")
        a = await deliver(client, alice, "q1:alice", raw=shared, attachments=(b"doc",))
        b = await deliver(client, bob, "q1:bob", raw=shared, attachments=(b"doc",))
        raw_key = (await client.get_message(alice.user_id, a)).blob_key
        await client.delete_message(alice.user_id, a, permanent=True)
        assert await gc_app.collect_garbage() == 0
        assert await client.get_blob(raw_key) == shared
        await client.delete_message(bob.user_id, b, permanent=True)
        await asyncio.sleep(0.01)  # let the clock pass the release time (grace is 0)
        assert await gc_app.collect_garbage() == 2  # the raw message and the attachment
        with pytest.raises(NotFound):
            await client.get_blob(raw_key)


async def test_gc_spares_a_released_blob_that_was_put_again_within_the_grace(
        gc_app: MetadataApp) -> None:
    assert gc_app.gc is not None
    gc_app.gc.grace = 3600.0
    hour_ago = time.time() - 2 * 3600
    async with MetadataClient(gc_app.grpc_addr) as client:
        alice = await client.create_user("alice@example.test", "pw")
        email_id = await deliver(client, alice, "d1", raw=b"raw bytes")
        key = (await client.get_message(alice.user_id, email_id)).blob_key
        await client.delete_message(alice.user_id, email_id, permanent=True)
        await gc_app.store.note_orphan(key, since=hour_ago)  # released long ago
        await client.put_blob(b"raw bytes")  # an in-flight delivery puts the same bytes
        assert await gc_app.collect_garbage() == 0
        assert await client.get_blob(key) == b"raw bytes"
        # Nobody referenced it after all: once its last write is old too, it goes.
        os.utime(gc_app.blobs.path(key), (hour_ago, hour_ago))
        await gc_app.store.note_orphan(key, since=hour_ago)
        assert await gc_app.collect_garbage() == 1
        assert not await gc_app.blobs.exists(key)


async def test_gc_takes_the_bytes_carried_only_for_refused_copies(gc_app: MetadataApp) -> None:
    """A batch's bytes are written before its copies are filed; those no filed copy
    refers to (their recipient was refused) are collected, the others stay."""
    refused = b"Subject: gone\r\n\r\nfor a mailbox that no longer exists\r\n"
    kept = b"Subject: hi\r\n\r\nfor alice, and for the same gone mailbox\r\n"

    def copy(user_id: str, key: str, blob_index: int) -> metadata_pb2.BatchedDelivery:
        request = metadata_pb2.StoreDeliveryRequest(user_id=user_id, delivery_key=key)
        return metadata_pb2.BatchedDelivery(request=request, blob_index=blob_index)

    async with MetadataClient(gc_app.grpc_addr) as client:
        alice = await client.create_user("alice@example.test", "pw")
        outcomes = await client.store_deliveries([refused, kept], [
            copy("no-such-user", "q1:gone", 0),
            copy(alice.user_id, "q2:alice", 1), copy("no-such-user", "q2:gone", 1)])
        assert [type(o) for o in outcomes] == [
            NotFound, metadata_pb2.StoreDeliveryResponse, NotFound]
        await asyncio.sleep(0.01)  # let the clock pass the release time (grace is 0)
        assert await gc_app.collect_garbage() == 1
        assert not await gc_app.blobs.exists(hashlib.sha256(refused).hexdigest())
        assert await gc_app.blobs.exists(hashlib.sha256(kept).hexdigest())
        # The same batch again: the refused bytes are written and collected again, the
        # repeated copy's bytes are its first filing's and stay.
        await client.store_deliveries([refused, kept], [copy("no-such-user", "q1:gone", 0),
                                                        copy(alice.user_id, "q2:alice", 1)])
        await asyncio.sleep(0.01)
        assert await gc_app.collect_garbage() == 1
        assert await gc_app.blobs.exists(hashlib.sha256(kept).hexdigest())
