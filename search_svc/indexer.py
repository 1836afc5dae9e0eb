"""Keeps the index in step with every mailbox: a durable JetStream consumer on EVENTS.

Events are taken in stream order, in batches. For each batch the indexer turns the
events into index operations (fetching the whole message from metadata_svc for a new
one, for its body, addresses and attachment names), applies them together with the
batch's last stream sequence, then acks them. A failure retries the same batch (in
order) until it succeeds, so nothing is skipped; a crash between apply and ack replays
events the index holds already, which changes nothing (operations are idempotent).

The index, not the consumer, is the authority on what was applied: at start, if the
consumer is ahead of the index (the index directory was lost or replaced), the consumer
is recreated to start right after the index's sequence. Events older than the stream
keeps (7 days) are then gone, and the log says to run `mailgrid reindex`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import MailgridError, Unavailable
from mailgrid.filing import fill_bodies
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, events_pb2
from search_svc.document import indexed_message, summary_of
from search_svc.pacing import IndexPacer
from search_svc.ports import Delete, Operation, SearchIndex, UpdateSummary, Upsert

log = logging.getLogger(__name__)

STREAM = "EVENTS"
DURABLE = "search-indexer"
FETCH_TIMEOUT = 0.5
# Seconds to wait for what is already there when topping up a short batch.
LINGER_FETCH_TIMEOUT = 0.05
# Messages asked of metadata_svc in one GetMessages call.
GET_MESSAGES_BATCH = 500
MAX_BACKOFF = 5.0


def consumer_config(ack_wait: float, start_after: int = 0) -> ConsumerConfig:
    config = ConsumerConfig(
        name=DURABLE,
        durable_name=DURABLE,
        filter_subject=f"{bus.EVENTS_PREFIX}.*",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,  # an event is never given up on: the index would miss a change
        max_ack_pending=10_000,
    )
    if start_after:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start_after + 1
    return config


class Indexer:
    """Applies EVENTS to a SearchIndex; ``wait_applied`` serves read-your-writes."""

    def __init__(self, index: SearchIndex, js: JetStreamContext, metadata: MetadataClient,
                 settings: Settings, *, batch: int = 256, ack_wait: float = 60.0,
                 linger: float = 0.0, pacer: IndexPacer | None = None) -> None:
        self.index = index
        self.js = js
        self.metadata = metadata
        self.settings = settings
        self.batch = batch
        self.linger = linger
        self.ack_wait = ack_wait
        # None: each batch is indexed as soon as it is fetched.
        self.pacer = pacer
        self._sub: JetStreamContext.PullSubscription | None = None
        self._applied = asyncio.Condition()
        # Set while a search waits for an event not applied yet: the pacer lets go.
        self._demand = asyncio.Event()
        self._waiting = 0
        # Serializes event batches with reindexing (search_svc.reindex).
        self.write_lock = asyncio.Lock()

    async def subscribe(self) -> None:
        applied = await self.index.applied_seq()
        await self._ensure_consumer(applied)
        try:
            self._sub = await self.js.pull_subscribe_bind(consumer=DURABLE, stream=STREAM)
        except Exception as err:  # nats raises several unrelated types here
            raise Unavailable(f"cannot bind to consumer {DURABLE}: {err}") from err

    async def _ensure_consumer(self, applied: int) -> None:
        try:
            info = await self.js.consumer_info(STREAM, DURABLE)
        except NotFoundError:
            info = None
        try:
            if info is not None and info.ack_floor is not None \
                    and (info.ack_floor.stream_seq or 0) > applied:
                log.warning("the search index is at event %d but its consumer acked up "
                            "to %d: replaying from %d", applied, info.ack_floor.stream_seq,
                            applied + 1)
                await self.js.delete_consumer(STREAM, DURABLE)
                info = None
            if info is None:
                await self.js.add_consumer(STREAM, consumer_config(self.ack_wait, applied))
            stream = await self.js.stream_info(STREAM)
        except Exception as err:
            raise Unavailable(f"cannot set up consumer {DURABLE}: {err}") from err
        first = stream.state.first_seq if stream.state else 0
        if applied and first > applied + 1:
            log.warning("events %d to %d expired before the index saw them: run "
                        "`mailgrid reindex` to rebuild it", applied + 1, first - 1)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetches and applies batches until ``stop`` is set (the batch in hand finishes)."""
        if self._sub is None:
            await self.subscribe()
        assert self._sub is not None
        async for msgs in bus.fetch_until(self._sub, stop, batch=self.batch,
                                          timeout=FETCH_TIMEOUT, name="indexer"):
            if len(msgs) < self.batch and self.linger > 0:
                msgs += await self._more(self.batch - len(msgs), stop)
            if self.pacer is not None:
                await self.pacer.wait(_stored(msgs[0]), self._demand, stop)
            await self._settle(msgs, stop)

    async def _more(self, wanted: int, stop: asyncio.Event) -> list[Msg]:
        """The events that arrive within ``linger`` of a short batch: each batch is one
        index commit, whose cost hardly depends on its size, so a busy stream is indexed
        in fewer, fuller commits (search waits for it by sequence, never by time)."""
        await bus.sleep_unless(stop, self.linger)
        assert self._sub is not None
        try:
            return await self._sub.fetch(wanted, timeout=LINGER_FETCH_TIMEOUT)
        except Exception:  # nothing more (a timeout), or NATS away: go with what we have
            return []

    async def _settle(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        """Applies one batch, retrying (in order) until it is applied or we stop."""
        backoff = 0.1
        while True:
            try:
                await self.apply_batch(msgs)
                break
            except Exception as err:
                if stop.is_set():
                    return  # unacked: redelivered to whoever runs next
                # A bug must not kill the indexer silently: it is logged and retried.
                log_failure = log.warning if isinstance(err, MailgridError) else log.exception
                log_failure("indexing %d events failed, retrying in %.1fs: %s",
                            len(msgs), backoff, err)
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await bus.sleep_unless(stop, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as err:  # lost with the connection: replayed, harmlessly
                log.warning("could not ack event %s: %s", _seq(msg), err)

    async def apply_batch(self, msgs: list[Msg]) -> None:
        events = [(_seq(msg), _decode(msg)) for msg in msgs]
        wanted = [(event.user_id, email_id) for _, event in events
                  if event is not None and event.user_id
                  and (email_id := _to_refresh(event))]
        # One GetMessages call for all the messages the batch adds or moves to Trash.
        current: dict[tuple[str, str], Operation] = {}
        for start in range(0, len(wanted), GET_MESSAGES_BATCH):
            chunk = wanted[start:start + GET_MESSAGES_BATCH]
            # Bodies kept only in the raw message are parsed here, not in metadata_svc
            # (which files mail on one writer): the same parse, under the same limits.
            messages = await self.metadata.get_messages(chunk, bodies_as_raw=True)
            records = await asyncio.to_thread(self._records, chunk, messages)
            current.update(zip(chunk, records, strict=True))
        ops = [self.operation(event, current) for _, event in events if event is not None]
        seq = max(seq for seq, _ in events)
        async with self.write_lock:
            await self.index.apply([op for op in ops if op is not None], seq)
        async with self._applied:
            self._applied.notify_all()

    def _records(self, wanted: list[tuple[str, str]],
                 messages: list[common_pb2.Message | None]) -> list[Operation]:
        """What the index is to hold of each message; a message gone since is deleted
        (later events bring later changes)."""
        records: list[Operation] = []
        for (user_id, email_id), message in zip(wanted, messages, strict=True):
            if message is None:
                records.append(Delete(user_id, email_id))
                continue
            if message.raw:
                fill_bodies(self.settings, message, message.raw)
                message.ClearField("raw")
            records.append(Upsert(indexed_message(user_id, message, summary_of(message))))
        return records

    def operation(self, event: events_pb2.MailEvent,
                  current: dict[tuple[str, str], Operation]) -> Operation | None:
        """The index operation an event calls for, given the messages as they are now."""
        kind = event.WhichOneof("kind")
        user_id = event.user_id
        if kind == "message_updated":
            return UpdateSummary(user_id, event.message_updated.message)
        if kind == "message_deleted" and event.message_deleted.permanent:
            return Delete(user_id, event.message_deleted.email_id)
        return current.get((user_id, _to_refresh(event)))

    async def wait_applied(self, seq: int, timeout: float) -> int:
        """Waits until the index has applied ``seq`` (or ``timeout`` passes); returns
        the sequence applied."""
        self._waiting += 1
        self._demand.set()
        try:
            async with self._applied:
                try:
                    async with asyncio.timeout(timeout):
                        while await self.index.applied_seq() < seq:
                            await self._applied.wait()
                except TimeoutError:
                    pass
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._demand.clear()
        return await self.index.applied_seq()


def _decode(msg: Msg) -> events_pb2.MailEvent | None:
    try:
        event = events_pb2.MailEvent.FromString(msg.data)
    except (DecodeError, ValueError) as err:
        log.error("event %s is not a MailEvent, skipped: %s", _seq(msg), err)
        return None
    if not event.user_id:
        log.error("event %s names no user, skipped", _seq(msg))
        return None
    return event


def _seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


def _stored(msg: Msg) -> dt.datetime | None:
    """When the stream stored ``msg`` (None if its metadata cannot say)."""
    try:
        return msg.metadata.timestamp
    except Exception:  # a reply subject in an unexpected form
        return None


def _to_refresh(event: events_pb2.MailEvent) -> str:
    """The email id whose current state the event's index operation needs, or ''."""
    kind = event.WhichOneof("kind")
    if kind == "message_added":
        return event.message_added.message.email_id
    if kind == "message_deleted" and not event.message_deleted.permanent:
        return event.message_deleted.email_id  # now in Trash
    return ""
