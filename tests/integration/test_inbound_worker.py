"""delivery_svc inbound workers against a real nats-server and a real metadata_svc."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from typing import TypeVar

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from delivery_svc.inbound import DEAD_SUBJECT, DURABLE, STREAM
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import Unavailable
from mailgrid.grpcutil import channel
from mailgrid.natsd import free_port
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2, delivery_pb2_grpc
from metadata_svc.app import MetadataApp

T = TypeVar("T")
PASSWORD = "correct horse battery staple"
ATTACHMENT = bytes(range(256)) * 40


@pytest.fixture
def app_settings(settings: Settings, nats_url: str) -> Settings:
    # Quick retries keep the outage tests short; the backoff shape is the same.
    return settings.model_copy(update={
        "nats_url": nats_url, "inbound_retry_delay": 0.2, "inbound_retry_max_delay": 1.0,
    })


@pytest.fixture
def client(metadata_client: MetadataClient) -> MetadataClient:
    return metadata_client


@pytest.fixture
async def delivery(app_settings: Settings, metadata: MetadataApp
                   ) -> AsyncIterator[DeliveryApp]:
    app = DeliveryApp(app_settings.model_copy(update={"metadata_addr": metadata.grpc_addr}))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await bus.connect(nats_url, "test")
    yield nc.jetstream()
    await nc.close()


# helpers


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str,
                     timeout: float = 30.0) -> T:
    """Polls ``probe`` until it returns something truthy (a wait, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = await probe()
        except Unavailable:  # a service restarting: its channel reconnects by itself
            result = None
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def make_message(subject: str, to: str = "alice@example.test",
                 attachment: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sender Person <sender@remote.example>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Tue, 10 May 2005 11:26:39 -0600"
    msg["Message-ID"] = f"<{abs(hash(subject))}@remote.example>"
    msg.set_content(f"Body of {subject}.\n")
    msg.add_alternative(f"<p>Body of <b>{subject}</b>.</p>", subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename="data.bin")
    return msg.as_bytes()


async def publish_job(js: JetStreamContext, client: MetadataClient, raw: bytes,
                      rcpts: list[str], queue_id: str, msg_id: str | None = None
                      ) -> delivery_pb2.InboundJob:
    stored = await client.put_blob(raw)
    job = delivery_pb2.InboundJob(queue_id=queue_id, blob_key=stored.blob_key,
                                  size=len(raw), mail_from="sender@remote.example",
                                  rcpt_to=rcpts, client_address="192.0.2.1",
                                  helo="remote.example")
    job.received_at.GetCurrentTime()
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), msg_id or queue_id)
    return job


async def inbox(client: MetadataClient, user: common_pb2.User
                ) -> list[common_pb2.MessageSummary]:
    reply = await client.list_messages(user.user_id, "inbox", page_size=200)
    return list(reply.messages)


async def inbound_empty(js: JetStreamContext) -> bool:
    """Every job settled: a work-queue stream forgets a message once it is acked."""
    info = await js.stream_info(STREAM)
    return info.state.messages == 0


async def dead_letters(js: JetStreamContext) -> list[delivery_pb2.DeadLetter]:
    info = await js.stream_info("DEAD")
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        raw = await js.get_msg("DEAD", seq)
        assert raw.subject == DEAD_SUBJECT
        letters.append(delivery_pb2.DeadLetter.FromString(raw.data or b""))
    return letters


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


# tests


async def test_job_is_filed_into_the_inbox_with_parsed_fields_and_attachments(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    raw = make_message("Quarterly numbers", attachment=ATTACHMENT)
    job = await publish_job(js, client, raw, ["Alice@Example.test"], "Q1")

    (summary,) = await eventually(lambda: inbox(client, alice), "the message in the inbox")
    assert summary.subject == "Quarterly numbers"
    assert summary.has_attachments
    assert summary.size == len(raw)
    message = await client.get_message(alice.user_id, summary.email_id)
    sender = getattr(message, "from")
    assert (sender.name, sender.email) == ("Sender Person", "sender@remote.example")
    assert message.text.strip() == "Body of Quarterly numbers."
    assert "<b>Quarterly numbers</b>" in message.html
    assert message.preview == "Body of Quarterly numbers."
    # With attachments, the bodies are kept: deriving them would decode those again.
    assert not message.bodies_from_raw
    assert message.blob_key == job.blob_key
    # The store keeps the arrival time to the millisecond or better.
    assert message.received_at.ToMilliseconds() == job.received_at.ToMilliseconds()
    (att,) = message.attachments
    assert (att.filename, att.content_type, att.size) == (
        "data.bin", "application/octet-stream", len(ATTACHMENT))
    assert att.blob_key
    described, body = await client.attachment(alice.user_id, message.email_id,
                                              att.attachment_id)
    assert described.filename == "data.bin"
    assert await read_all(body) == ATTACHMENT
    assert await read_all(client.raw_message(alice.user_id, message.email_id)) == raw
    await eventually(lambda: inbound_empty(js), "the job to be acked")
    assert await dead_letters(js) == []


async def test_a_message_without_attachments_leaves_its_bodies_to_the_raw_message(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    raw = make_message("Plain words")
    job = inline_job(raw, ["alice@example.test"], "Q-plain")
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), job.queue_id)

    (summary,) = await eventually(lambda: inbox(client, alice), "the message in the inbox")
    message = await client.get_message(alice.user_id, summary.email_id)
    assert message.bodies_from_raw  # the body bytes were sent and stored once
    assert message.text.strip() == "Body of Plain words."
    assert "<b>Plain words</b>" in message.html
    assert message.preview == "Body of Plain words."


async def test_redelivered_job_is_filed_once(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    raw = make_message("Only once")
    job = await publish_job(js, client, raw, ["alice@example.test"], "Q-once", "first")
    # The same job again under another Nats-Msg-Id: as if redelivered after a crash.
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), "second")

    await eventually(lambda: inbound_empty(js), "both copies of the job to be settled")
    messages = await inbox(client, alice)
    assert [m.subject for m in messages] == ["Only once"]


async def test_two_recipients_get_one_copy_each_sharing_the_raw_blob(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    bob = await client.create_user("bob@example.org", PASSWORD)
    raw = make_message("For both", attachment=ATTACHMENT)
    job = await publish_job(js, client, raw, ["alice@example.test", "bob@example.org"], "Q2")

    await eventually(lambda: inbound_empty(js), "the job to be acked")
    (for_alice,) = await inbox(client, alice)
    (for_bob,) = await inbox(client, bob)
    copy_a = await client.get_message(alice.user_id, for_alice.email_id)
    copy_b = await client.get_message(bob.user_id, for_bob.email_id)
    assert copy_a.blob_key == copy_b.blob_key == job.blob_key
    assert copy_a.attachments[0].blob_key == copy_b.attachments[0].blob_key


async def test_unknown_recipient_is_dead_lettered_and_the_others_are_filed(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    raw = make_message("Partly lost")
    job = await publish_job(js, client, raw, ["ghost@example.test", "alice@example.test"],
                            "Q3")

    (letter,) = await eventually(lambda: dead_letters(js), "a dead letter")
    assert letter.reason == "unknown recipient <ghost@example.test>"
    assert (letter.stream, letter.subject) == (STREAM, bus.INBOUND_SUBJECT)
    assert letter.blob_key == job.blob_key
    assert letter.attempts == 1
    assert letter.HasField("failed_at")
    retry = delivery_pb2.InboundJob.FromString(letter.payload)
    assert list(retry.rcpt_to) == ["ghost@example.test"]
    assert retry.queue_id == "Q3"
    await eventually(lambda: inbound_empty(js), "the job to be settled")
    assert [m.subject for m in await inbox(client, alice)] == ["Partly lost"]


async def test_job_waits_while_metadata_is_down_and_is_filed_once_it_is_back(
        app_settings: Settings, js: JetStreamContext) -> None:
    addr = f"127.0.0.1:{free_port()}"
    meta_settings = app_settings.model_copy(update={"metadata_addr": addr})
    metadata = MetadataApp(meta_settings)
    await metadata.start()
    delivery = DeliveryApp(meta_settings)
    await delivery.start()
    try:
        async with MetadataClient(addr) as client:
            alice = await client.create_user("alice@example.test", PASSWORD)
            blob = await client.put_blob(make_message("Patience"))
            await metadata.stop()
            job = delivery_pb2.InboundJob(queue_id="Q4", blob_key=blob.blob_key, size=1,
                                          rcpt_to=["alice@example.test"])
            await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), "Q4")

            async def redelivered() -> bool:
                info = await js.consumer_info(STREAM, DURABLE)
                return (info.num_redelivered or 0) >= 1

            await eventually(redelivered, "the job to be retried while metadata is down")
            metadata = MetadataApp(meta_settings)
            await metadata.start()
            (summary,) = await eventually(lambda: inbox(client, alice),
                                          "the job to be filed once metadata is back")
            assert summary.subject == "Patience"
            await eventually(lambda: inbound_empty(js), "the job to be acked")
            assert await dead_letters(js) == []
    finally:
        await delivery.stop()
        await metadata.stop()


async def test_job_failing_on_every_allowed_delivery_ends_in_dead(
        app_settings: Settings, js: JetStreamContext) -> None:
    # Nothing listens on this port: every attempt finds metadata_svc down.
    down = app_settings.model_copy(update={
        "metadata_addr": f"127.0.0.1:{free_port()}", "inbound_max_deliver": 2})
    delivery = DeliveryApp(down)
    await delivery.start()
    try:
        job = delivery_pb2.InboundJob(queue_id="Q5", blob_key="b" * 64, size=10,
                                      rcpt_to=["alice@example.test"])
        await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), "Q5")
        (letter,) = await eventually(lambda: dead_letters(js), "the job in DEAD")
    finally:
        await delivery.stop()
    assert letter.attempts == 2
    assert letter.reason.startswith("gave up after 2 attempts")
    assert letter.blob_key == "b" * 64
    assert delivery_pb2.InboundJob.FromString(letter.payload).queue_id == "Q5"
    assert await inbound_empty(js)


async def test_garbage_payload_goes_to_dead_and_the_next_good_job_is_filed(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    await bus.publish(js, bus.INBOUND_SUBJECT, b"this is not a protobuf", "garbage")
    await publish_job(js, client, make_message("After the garbage"),
                      ["alice@example.test"], "Q6")

    (summary,) = await eventually(lambda: inbox(client, alice), "the good job filed")
    assert summary.subject == "After the garbage"
    (letter,) = await eventually(lambda: dead_letters(js), "the garbage in DEAD")
    assert letter.payload == b"this is not a protobuf"
    assert letter.reason.startswith("payload is not an InboundJob")
    assert letter.blob_key == ""
    await eventually(lambda: inbound_empty(js), "both jobs settled")


async def test_job_without_recipients_goes_to_dead_as_poison(
        delivery: DeliveryApp, js: JetStreamContext) -> None:
    job = delivery_pb2.InboundJob(queue_id="Q-empty", blob_key="d" * 64)
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), "Q-empty")
    (letter,) = await eventually(lambda: dead_letters(js), "the job in DEAD")
    assert letter.reason == "InboundJob without rcpt_to"
    assert letter.blob_key == "d" * 64
    assert letter.payload == job.SerializeToString()
    await eventually(lambda: inbound_empty(js), "the job to be terminated")


async def test_broken_mime_is_still_filed_with_its_problems(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    raw = (b"Subject: broken\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
           b"--zz\r\nContent-Type: text/plain; charset=no-such\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n%%%aGk=\r\n")
    await publish_job(js, client, raw, ["alice@example.test"], "Q7")
    (summary,) = await eventually(lambda: inbox(client, alice), "the broken message filed")
    message = await client.get_message(alice.user_id, summary.email_id)
    assert message.subject == "broken"
    assert message.parse_problems
    assert await read_all(client.raw_message(alice.user_id, message.email_id)) == raw


async def test_two_instances_file_fifty_jobs_exactly_once(
        app_settings: Settings, metadata: MetadataApp, client: MetadataClient,
        js: JetStreamContext) -> None:
    settings = app_settings.model_copy(update={"metadata_addr": metadata.grpc_addr})
    apps = [DeliveryApp(settings), DeliveryApp(settings)]
    for app in apps:
        await app.start()
    try:
        alice = await client.create_user("alice@example.test", PASSWORD)
        for n in range(50):
            await publish_job(js, client, make_message(f"Job {n}"), ["alice@example.test"],
                              f"Q-{n}")

        async def all_filed() -> bool:
            return len(await inbox(client, alice)) >= 50 and await inbound_empty(js)

        await eventually(all_filed, "all 50 jobs filed", timeout=60)
    finally:
        for app in apps:
            await app.stop()
    subjects = sorted(m.subject for m in await inbox(client, alice))
    assert subjects == sorted(f"Job {n}" for n in range(50))


async def test_queue_stats_report_streams_and_consumers(
        app_settings: Settings, js: JetStreamContext) -> None:
    down = app_settings.model_copy(update={"metadata_addr": f"127.0.0.1:{free_port()}"})
    delivery = DeliveryApp(down)
    await delivery.start()
    try:
        job = delivery_pb2.InboundJob(queue_id="Q8", blob_key="c" * 64, size=10,
                                      rcpt_to=["alice@example.test"])
        await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), "Q8")
        await bus.publish(js, bus.INBOUND_SUBJECT, b"\xff\xff garbage", "garbage")
        async with channel(delivery.grpc_addr) as chan:
            stub = delivery_pb2_grpc.DeliveryServiceStub(chan)

            async def stats_settled() -> dict[str, delivery_pb2.QueueStats] | None:
                reply = await stub.GetQueueStats(delivery_pb2.GetQueueStatsRequest())
                queues = {q.stream: q for q in reply.queues}
                inbound, dead = queues["INBOUND"], queues["DEAD"]
                # The job waits for metadata_svc (retried); the garbage is in DEAD.
                if inbound.messages == 1 and inbound.redelivered >= 1 and dead.messages == 1:
                    return queues
                return None

            queues = await eventually(stats_settled, "stats to show the retried job")
    finally:
        await delivery.stop()
    assert sorted(queues) == ["DEAD", "EVENTS", "INBOUND", "OUTBOUND"]
    assert queues["INBOUND"].bytes > 0
    assert queues["DEAD"].bytes > 0
    assert queues["OUTBOUND"].messages == 0


async def test_stop_is_graceful_with_no_work(app_settings: Settings) -> None:
    app = DeliveryApp(app_settings.model_copy(
        update={"metadata_addr": f"127.0.0.1:{free_port()}"}))
    await app.start()
    assert app.grpc_addr.startswith("127.0.0.1:")
    await app.stop()
    with contextlib.suppress(Exception):
        await app.stop()  # a second stop is harmless


async def test_a_job_whose_blob_is_missing_goes_to_dead_while_other_mail_is_filed(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    missing = delivery_pb2.InboundJob(queue_id="Q-missing", blob_key="e" * 64, size=10,
                                      rcpt_to=["alice@example.test"])
    await bus.publish(js, bus.INBOUND_SUBJECT, missing.SerializeToString(), "Q-missing")
    await publish_job(js, client, make_message("Flowing past"), ["alice@example.test"],
                      "Q-good")
    (summary,) = await eventually(lambda: inbox(client, alice), "the good job filed")
    assert summary.subject == "Flowing past"
    (letter,) = await eventually(lambda: dead_letters(js), "the job in DEAD")
    assert letter.blob_key == "e" * 64
    await eventually(lambda: inbound_empty(js), "both jobs settled")


def inline_job(raw: bytes, rcpts: list[str], queue_id: str) -> delivery_pb2.InboundJob:
    """A job carrying its raw message, as the SMTP edge publishes small ones."""
    job = delivery_pb2.InboundJob(queue_id=queue_id, raw=raw, size=len(raw),
                                  mail_from="sender@remote.example", rcpt_to=rcpts)
    job.received_at.GetCurrentTime()
    return job


async def test_a_job_carrying_its_bytes_is_filed_and_its_bytes_and_attachment_stored(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    raw = make_message("Carried", attachment=ATTACHMENT)
    job = inline_job(raw, ["alice@example.test"], "Q-inline")
    await bus.publish(js, bus.INBOUND_SUBJECT, job.SerializeToString(), job.queue_id)

    (summary,) = await eventually(lambda: inbox(client, alice), "the message in the inbox")
    message = await client.get_message(alice.user_id, summary.email_id)
    assert await read_all(client.raw_message(alice.user_id, message.email_id)) == raw
    (att,) = message.attachments
    _, body = await client.attachment(alice.user_id, message.email_id, att.attachment_id)
    assert await read_all(body) == ATTACHMENT
    await eventually(lambda: inbound_empty(js), "the job to be acked")


async def test_a_batch_message_files_each_job_and_dead_letters_only_the_unknown_recipient(
        delivery: DeliveryApp, client: MetadataClient, js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    bob = await client.create_user("bob@example.org", PASSWORD)
    first = inline_job(make_message("First of batch"), ["alice@example.test"], "QB1")
    second = inline_job(make_message("Second of batch"),
                        ["bob@example.org", "ghost@example.test"], "QB2")
    batch = delivery_pb2.InboundBatch(jobs=[first, second])
    await bus.publish(js, bus.INBOUND_SUBJECT, batch.SerializeToString(), "batch-QB1",
                      headers={bus.INBOUND_BATCH_HEADER: "2"})

    (letter,) = await eventually(lambda: dead_letters(js), "a dead letter")
    assert letter.reason == "unknown recipient <ghost@example.test>"
    single = delivery_pb2.InboundJob.FromString(letter.payload)
    assert (single.queue_id, list(single.rcpt_to)) == ("QB2", ["ghost@example.test"])
    await eventually(lambda: inbound_empty(js), "the batch to be settled")
    assert [m.subject for m in await inbox(client, alice)] == ["First of batch"]
    assert [m.subject for m in await inbox(client, bob)] == ["Second of batch"]


async def test_a_batch_whose_store_is_down_is_retried_whole_and_filed_once(
        app_settings: Settings, metadata: MetadataApp, client: MetadataClient,
        js: JetStreamContext) -> None:
    alice = await client.create_user("alice@example.test", PASSWORD)
    jobs = [inline_job(make_message(f"Retry {n}"), ["alice@example.test"], f"QR{n}")
            for n in range(3)]
    batch = delivery_pb2.InboundBatch(jobs=jobs)
    # A delivery_svc pointed at a metadata_svc that is not there yet: every attempt
    # fails until it is pointed at the real one (a restart with the right address).
    dead_addr = f"127.0.0.1:{free_port()}"
    broken = DeliveryApp(app_settings.model_copy(update={"metadata_addr": dead_addr}))
    await broken.start()
    try:
        await bus.publish(js, bus.INBOUND_SUBJECT, batch.SerializeToString(), "batch-QR0",
                          headers={bus.INBOUND_BATCH_HEADER: "3"})
        await asyncio.sleep(1.0)  # let it fail at least once
        assert await inbox(client, alice) == []
    finally:
        await broken.stop()
    working = DeliveryApp(app_settings.model_copy(update={"metadata_addr": metadata.grpc_addr}))
    await working.start()
    try:
        await eventually(lambda: inbound_empty(js), "the batch to be filed")
    finally:
        await working.stop()
    assert sorted(m.subject for m in await inbox(client, alice)) == [
        "Retry 0", "Retry 1", "Retry 2"]
