"""The SMTP edge's group commit: jobs accepted together are stored together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from gateway.inbound_publisher import InboundPublisher, batch_payload
from mailgrid import bus
from mailgrid.errors import Unavailable
from mailgrid.v1 import delivery_pb2
from tests.integration.test_smtp_mx import inbound_messages


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_url, "test-publisher")
    yield nc.jetstream()
    await nc.close()


def job(n: int, size: int = 100) -> delivery_pb2.InboundJob:
    return delivery_pb2.InboundJob(queue_id=f"Q{n:04d}", raw=b"x" * size,
                                   rcpt_to=["a@example.test"])


async def publish(publisher: InboundPublisher, job: delivery_pb2.InboundJob) -> None:
    await publisher.publish(job.queue_id, job.SerializeToString())


async def test_jobs_published_together_are_stored_in_fewer_messages_each_once(
        js: JetStreamContext) -> None:
    publisher = InboundPublisher(js, timeout=5.0)
    await asyncio.gather(*(publish(publisher, job(n)) for n in range(50)))
    messages = await inbound_messages(js)
    queue_ids = [j.queue_id for jobs in messages for j in jobs]
    assert sorted(queue_ids) == [f"Q{n:04d}" for n in range(50)]
    assert len(messages) < 50


@pytest.mark.parametrize("sizes", [[0], [1, 126, 127, 128], [16383, 16384, 2_100_000]])
def test_batch_payload_is_the_inbound_batch_wire_form(sizes: list[int]) -> None:
    jobs = [job(n, size) for n, size in enumerate(sizes)]
    payload = batch_payload([j.SerializeToString() for j in jobs])
    assert payload == delivery_pb2.InboundBatch(jobs=jobs).SerializeToString()
    assert list(delivery_pb2.InboundBatch.FromString(payload).jobs) == jobs


async def test_a_lone_job_is_stored_as_a_plain_inbound_job(js: JetStreamContext) -> None:
    publisher = InboundPublisher(js, timeout=5.0)
    await publish(publisher, job(1))
    info = await js.stream_info("INBOUND")
    msg = await js.get_msg("INBOUND", info.state.last_seq)
    assert not msg.headers or bus.INBOUND_BATCH_HEADER not in msg.headers
    assert delivery_pb2.InboundJob.FromString(msg.data or b"").queue_id == "Q0001"


async def test_batches_stay_under_the_byte_cap(js: JetStreamContext) -> None:
    publisher = InboundPublisher(js, timeout=5.0, max_batch_bytes=3000)
    await asyncio.gather(*(publish(publisher, job(n, size=1000)) for n in range(10)))
    messages = await inbound_messages(js)
    assert all(sum(j.ByteSize() for j in jobs) <= 3000 or len(jobs) == 1
               for jobs in messages)
    assert sorted(j.queue_id for jobs in messages for j in jobs) == [
        f"Q{n:04d}" for n in range(10)]


async def test_every_waiting_job_fails_when_the_store_cannot_take_the_batch(
        js: JetStreamContext) -> None:
    publisher = InboundPublisher(js, timeout=5.0)
    await js.delete_stream("INBOUND")  # no stream: nothing can acknowledge the publish
    outcomes = await asyncio.gather(*(publish(publisher, job(n)) for n in range(5)),
                                    return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes)
