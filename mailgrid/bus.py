"""The NATS JetStream bus: stream definitions, connection and publishing.

Streams (DESIGN.md): INBOUND and OUTBOUND are work queues, EVENTS keeps each user's
mailbox changes for a while, DEAD keeps what could not be done for an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.aio.client
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from mailgrid.errors import Unavailable

log = logging.getLogger(__name__)

INBOUND_SUBJECT = "mail.inbound"
# Header of an INBOUND message whose payload is an InboundBatch, not one InboundJob.
INBOUND_BATCH_HEADER = "Mailgrid-Inbound-Batch"
OUTBOUND_PREFIX = "mail.outbound"
EVENTS_PREFIX = "mail.events"
# EVENTS republishes each stored event here, with its stream sequence in Nats-Sequence and
# the previous sequence of the same subject in Nats-Last-Sequence (gap detection): what
# realtime_svc listens to with one core subscription per user.
LIVE_PREFIX = "mail.live"
DEAD_PREFIX = "mail.dead"
DAY = 24 * 3600.0

# Atomic batch publish (ADR-50, nats-server 2.12): the messages of a batch are stored
# together or not at all, under one commit, so that with sync_interval: always a batch
# costs a few fsyncs instead of one per message.
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
# JetStream's error code for a batch that holds a Nats-Msg-Id stored before (within the
# stream's duplicate window): nothing of it is stored.
BATCH_DUPLICATE = 10201


def events_subject(user_id: str) -> str:
    return f"{EVENTS_PREFIX}.{user_id}"


def live_subject(user_id: str) -> str:
    return f"{LIVE_PREFIX}.{user_id}"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    retention: RetentionPolicy
    max_age: float = 0.0  # seconds; 0 keeps messages until consumed or removed
    # (source, destination): stored messages are republished (core NATS) to destination.
    republish: tuple[str, str] | None = None
    # Accepts atomic batches (publish_atomic).
    atomic: bool = False

    def config(self, replicas: int) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=self.subjects,
            retention=self.retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=self.max_age or None,
            discard=DiscardPolicy.OLD,
            # Publishers set Nats-Msg-Id; a retried publish within this window is stored once.
            duplicate_window=120.0,
            republish=RePublish(src=self.republish[0], dest=self.republish[1])
            if self.republish else None,
            allow_atomic=True if self.atomic else None,
        )


STREAMS = (
    StreamSpec("INBOUND", [INBOUND_SUBJECT], RetentionPolicy.WORK_QUEUE),
    StreamSpec("OUTBOUND", [f"{OUTBOUND_PREFIX}.>"], RetentionPolicy.WORK_QUEUE),
    StreamSpec("EVENTS", [f"{EVENTS_PREFIX}.*"], RetentionPolicy.LIMITS, max_age=7 * DAY,
               republish=(f"{EVENTS_PREFIX}.*", f"{LIVE_PREFIX}.{{{{wildcard(1)}}}}"),
               atomic=True),
    StreamSpec("DEAD", [f"{DEAD_PREFIX}.>"], RetentionPolicy.LIMITS, max_age=30 * DAY),
)


# nats-py reads the socket 32 KiB at a time into a StreamReader of the same limit, so a
# message of a megabyte (a batch of inbound jobs) pauses and resumes the socket and
# passes through the protocol parser some 30 times; with one MiB it does so once or
# twice. nats-py has no option for it, only this module constant, read at connect and
# at every read.
READ_BUFFER = 1024 * 1024
nats.aio.client.DEFAULT_BUFFER_SIZE = READ_BUFFER


async def connect(url: str, name: str, **options: Any) -> NATS:
    """Connects with endless reconnects: a service outlives a NATS restart.

    ``options`` go to nats.connect as they are (e.g. ``reconnected_cb``).
    """
    # A cluster is given as several comma-separated URLs (any one is enough to join; the
    # client learns the others from the server and fails over to them).
    servers = [part.strip() for part in url.split(",") if part.strip()]
    try:
        return await nats.connect(
            servers,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            allow_reconnect=True,
            **options,
        )
    except Exception as err:  # nats raises several unrelated types here
        raise Unavailable(f"cannot connect to NATS at {url}: {err}") from err


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Creates the streams, or updates their configuration to this version's.

    ``replicas`` (settings.nats_replicas) is the number of cluster nodes keeping each
    stream; an existing stream is never given fewer than it has, so one instance started
    with the default of 1 cannot undo a cluster's R3.
    """
    for spec in STREAMS:
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(spec.config(replicas))
            log.info("created stream %s (%d replica(s))", spec.name, replicas)
        else:
            have = info.config.num_replicas or 1
            await js.update_stream(spec.config(max(replicas, have)))


async def publish(js: JetStreamContext, subject: str, payload: bytes, msg_id: str,
                  timeout: float = 5.0, headers: dict[str, str] | None = None) -> int:
    """Publishes durably (the ack means stored) and returns the stream sequence."""
    try:
        ack = await js.publish(subject, payload, timeout=timeout,
                               headers={**(headers or {}), "Nats-Msg-Id": msg_id})
    except Exception as err:  # timeouts, no responders, connection loss
        raise Unavailable(f"could not publish to {subject}: {err}") from err
    return int(ack.seq)


class BatchRejected(Exception):
    """The stream refused an atomic batch as a whole: none of its messages is stored."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (JetStream error {code})")
        self.code = code


async def accepts_atomic(js: JetStreamContext, stream: str) -> bool:
    """Whether ``stream`` takes atomic batches (it must say so: a server that does not know
    them would store a batch's messages one by one, unacknowledged)."""
    try:
        info = await js.stream_info(stream)
    except Exception as err:  # timeouts, no responders, connection loss
        raise Unavailable(f"could not read stream {stream}: {err}") from err
    return bool(info.config.allow_atomic)


async def publish_atomic(nc: NATS, messages: Sequence[tuple[str, bytes, str]],
                         timeout: float = 5.0) -> int:
    """Publishes ``messages`` (subject, payload, Nats-Msg-Id) as one atomic batch to a
    stream that accepts them, and returns the last one's stream sequence.

    Only the commit, the last message, is answered: the ack means all are stored, in
    order. Raises BatchRejected when the stream refuses the batch (BATCH_DUPLICATE when a
    message id was stored before, as after a commit whose ack was lost) and Unavailable
    when NATS does not answer.
    """
    batch_id = uuid.uuid4().hex
    *body, (subject, payload, msg_id) = messages
    try:
        for position, (part_subject, part_payload, part_id) in enumerate(body, 1):
            await nc.publish(part_subject, part_payload, headers={
                BATCH_ID: batch_id, BATCH_SEQUENCE: str(position), "Nats-Msg-Id": part_id})
        reply = await nc.request(subject, payload, timeout=timeout, headers={
            BATCH_ID: batch_id, BATCH_SEQUENCE: str(len(messages)), BATCH_COMMIT: "1",
            "Nats-Msg-Id": msg_id})
        ack = json.loads(reply.data)
    except Exception as err:  # timeouts, no responders, connection loss, a garbled reply
        raise Unavailable(f"could not publish a batch to {subject}: {err}") from err
    error = ack.get("error")
    if error:
        raise BatchRejected(int(error.get("err_code", 0)), str(error.get("description", "")))
    if ack.get("batch") != batch_id or ack.get("count") != len(messages):
        raise Unavailable(f"unexpected answer to a batch published to {subject}: {ack}")
    return int(ack["seq"])


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleeps ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def stream_seq(msg: Msg) -> str:
    """The stream sequence of a JetStream message, for logs ("?" if it has none)."""
    try:
        return str(msg.metadata.sequence.stream)
    except Exception:
        return "?"


async def fetch_until(sub: JetStreamContext.PullSubscription, stop: asyncio.Event, *,
                      batch: int, timeout: float, name: str) -> AsyncIterator[list[Msg]]:
    """Yields each non-empty batch a pull subscription fetches until ``stop`` is set.

    Idle fetches (a timeout, or an empty batch) and NATS reconnects are ridden out here,
    so a worker only sees work; the subscription is dropped at the end.
    """
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=timeout)
            except TimeoutError:  # nats-py raises its own subclass, or asyncio's own
                continue
            except Exception as err:  # NATS reconnecting, or closed under us
                if stop.is_set():
                    break
                log.warning("%s: fetch failed: %s", name, err)
                await sleep_unless(stop, 1.0)
                continue
            if msgs:
                yield msgs
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
