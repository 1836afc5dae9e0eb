"""Inbound runner: files each accepted SMTP transaction into its recipients' mailboxes.

A durable JetStream pull consumer on INBOUND, taken in batches. For each job: its raw
message (carried in the job when small, else fetched from the blob store), parsed
(mailgrid.mime never fails), then one copy per recipient, idempotent on
``queue_id:recipient`` so a redelivered job never duplicates mail. The copies of a batch
go to metadata_svc in one StoreDeliveries call with the bytes they carry (raw messages
and attachments, content-addressed), so a batch costs one group commit of blobs and one
transaction. A job is acked only after every recipient is stored.

Outcomes map to acks (DESIGN.md, nats.py examples):
- all stored → ack();
- a temporary failure (metadata_svc down, mailbox full, anything unexpected) → nak with
  an exponentially growing delay;
- a recipient that does not exist → a DeadLetter for that recipient, the others stored;
- the last allowed delivery failing, or a payload that cannot be read → DeadLetter on
  mail.dead.inbound (the raw bytes stay in the blob store or in the job), then term().
  Nothing is ever dropped: if even the DeadLetter cannot be published, the job is
  nak'ed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from delivery_svc.checks import InboundChecks, JobChecks
from delivery_svc.checks.notice import virus_notice
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import (
    InvalidArgument,
    MailgridError,
    NotFound,
    StorageFull,
    Unavailable,
)
from mailgrid.filing import parse_raw, store_attachments
from mailgrid.mime import ParsedEmail, iter_attachments
from mailgrid.settings import Settings
from mailgrid.usercache import UserCache
from mailgrid.v1 import common_pb2, delivery_pb2, metadata_pb2

log = logging.getLogger(__name__)

STREAM = "INBOUND"
DURABLE = "inbound-workers"
DEAD_SUBJECT = f"{bus.DEAD_PREFIX}.inbound"
# Seconds one fetch waits for jobs; bounds how long a stop waits for an idle worker. Also
# how long a worker may sit on jobs it has: nats-py's fetch of a batch, once a first job
# has come to its waiting pull, waits for a full batch or this timeout before it returns
# (at 1 s, the last jobs of a burst were filed a second late in one bench round in five).
FETCH_TIMEOUT = 0.2
# Bytes one StoreDeliveries call carries at most (raw messages, attachments and the
# parsed copies), well under the 16 MiB gRPC message limit even after the job that
# passes it (at most 512 KiB inline plus 2 MiB of bodies); a fuller batch is stored in
# several calls.
BATCH_BYTES = 6 * 1024 * 1024


class PoisonJob(Exception):
    """A payload that can never be processed (not an InboundJob, or missing fields)."""

    def __init__(self, reason: str, blob_key: str = "") -> None:
        super().__init__(reason)
        self.blob_key = blob_key


class JobFailed(Exception):
    """The whole job failed for good (e.g. its raw message is gone)."""


@dataclass
class Report:
    """What one attempt did for each recipient (Mailman's SomeRecipientsFailed)."""

    stored: list[str] = field(default_factory=list)
    permanent: list[tuple[str, str]] = field(default_factory=list)
    temporary: list[tuple[str, MailgridError]] = field(default_factory=list)


@dataclass
class Filing:
    """One job of a batch: its copies waiting in the batch, and what became of them."""

    msg: Msg
    job: delivery_pb2.InboundJob
    attempts: int
    report: Report = field(default_factory=Report)
    # Why the whole job can never be filed (e.g. its raw message is gone).
    failed: str = ""


class Batch:
    """The copies of the jobs filed together, and the bytes they carry (each once)."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []
        self.deliveries: list[metadata_pb2.BatchedDelivery] = []
        self.size = 0
        # The job and recipient of each delivery, in order.
        self.copies: list[tuple[Filing, str]] = []
        self._index: dict[str, int] = {}
        # Each recipient's sender allow/block lists, as read for this batch.
        self.sender_lists: dict[str, list[common_pb2.SenderListEntry]] = {}

    def add_blob(self, key: str, data: bytes) -> int:
        """The index of ``data`` in blobs, added once per ``key`` (a name that always
        stands for the same bytes)."""
        if key not in self._index:
            self._index[key] = len(self.blobs)
            self.blobs.append(data)
            self.size += len(data)
        return self._index[key]

    def add_delivery(self, filing: Filing, rcpt: str,
                     delivery: metadata_pb2.BatchedDelivery) -> None:
        self.deliveries.append(delivery)
        self.copies.append((filing, rcpt))
        self.size += delivery.ByteSize()  # the parsed bodies travel in it too


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The durable consumer every inbound worker of every instance shares."""
    # No consumer-level BackOff list: nats-server then ignores the delay of a NAK from the
    # second redelivery on (redelivering after the BackOff step instead), and the worker's
    # own exponential nak(delay=...) is the retry schedule. ack_wait covers a lost worker.
    return ConsumerConfig(
        name=DURABLE,
        durable_name=DURABLE,
        filter_subject=bus.INBOUND_SUBJECT,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.inbound_ack_wait,
        max_deliver=settings.inbound_max_deliver,
        max_ack_pending=1000,
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings) -> None:
    """Creates the durable consumer, or updates it to this version's configuration."""
    try:
        await js.add_consumer(STREAM, consumer_config(settings))
    except Exception as err:  # nats raises several unrelated types here
        raise Unavailable(f"cannot create consumer {DURABLE} on {STREAM}: {err}") from err


def decode_jobs(data: bytes, headers: dict[str, str] | None) -> list[delivery_pb2.InboundJob]:
    """The jobs of an INBOUND message: an InboundBatch when the header says so, else one
    InboundJob. PoisonJob if any of them cannot be processed."""
    if not headers or bus.INBOUND_BATCH_HEADER not in headers:
        return [decode_job(data)]
    try:
        batch = delivery_pb2.InboundBatch.FromString(data)
    except (DecodeError, ValueError) as err:
        raise PoisonJob(f"payload is not an InboundBatch: {err}") from err
    if not batch.jobs:
        raise PoisonJob("InboundBatch without jobs")
    return [check_job(job) for job in batch.jobs]


def decode_job(data: bytes) -> delivery_pb2.InboundJob:
    """The InboundJob in ``data``; PoisonJob if it is not one that can be processed."""
    try:
        job = delivery_pb2.InboundJob.FromString(data)
    except (DecodeError, ValueError) as err:
        raise PoisonJob(f"payload is not an InboundJob: {err}") from err
    return check_job(job)


def check_job(job: delivery_pb2.InboundJob) -> delivery_pb2.InboundJob:
    """``job`` if it has what filing needs; PoisonJob otherwise."""
    missing = [name for name, value in (("queue_id", job.queue_id),
                                        ("blob_key or raw", job.blob_key or job.raw),
                                        ("rcpt_to", list(job.rcpt_to))) if not value]
    if missing:
        raise PoisonJob(f"InboundJob without {', '.join(missing)}", job.blob_key)
    return job


def delivery_key(queue_id: str, rcpt: str) -> str:
    return f"{queue_id}:{rcpt.lower()}"


def _bodies_in_raw(parsed: metadata_pb2.ParsedMessage) -> metadata_pb2.ParsedMessage:
    """``parsed`` as filed: without its text and html, which the store derives from the
    raw message it keeps anyway, so the body bytes travel and are written once.

    A message with attachments keeps its bodies: deriving them would mean parsing (and
    decoding) its attachments again on every read.
    """
    if parsed.attachments:
        return parsed
    filed = metadata_pb2.ParsedMessage()
    filed.CopyFrom(parsed)
    filed.ClearField("text")
    filed.ClearField("html")
    filed.bodies_from_raw = True
    return filed


def _refusal(rcpt: str, err: MailgridError) -> str:
    return (f"unknown recipient <{rcpt}>" if isinstance(err, NotFound)
            else f"recipient <{rcpt}> refused: {err.detail}")


class InboundWorker:
    """One worker: fetches one job at a time from the shared durable consumer."""

    def __init__(self, settings: Settings, js: JetStreamContext, metadata: MetadataClient,
                 name: str = "inbound", checks: InboundChecks | None = None) -> None:
        self.settings = settings
        self.checks = checks or InboundChecks(settings)
        self.js = js
        self.metadata = metadata
        self.users = UserCache(metadata)
        self.name = name
        self._sub: JetStreamContext.PullSubscription | None = None
        # The copies being gathered for the next StoreDeliveries call.
        self._batch = Batch()

    async def subscribe(self) -> None:
        try:
            self._sub = await self.js.pull_subscribe_bind(consumer=DURABLE, stream=STREAM)
        except Exception as err:
            raise Unavailable(f"cannot bind to consumer {DURABLE}: {err}") from err

    async def run(self, stop: asyncio.Event) -> None:
        """Fetches and files batches of jobs until ``stop`` is set; the batch in hand is
        finished."""
        if self._sub is None:
            await self.subscribe()
        assert self._sub is not None
        async for msgs in bus.fetch_until(self._sub, stop, batch=self.settings.inbound_batch,
                                          timeout=FETCH_TIMEOUT, name=self.name):
            try:
                pause = await self.handle(msgs)
            except Exception:  # e.g. an ack lost with the connection: NATS redelivers
                # after ack_wait and the delivery keys keep every copy single.
                log.exception("%s: could not settle a batch of %d", self.name, len(msgs))
                pause = 1.0
            if pause:  # a dependency is down: let it recover before the next batch
                await bus.sleep_unless(stop, pause)

    async def handle(self, msgs: list[Msg]) -> float:
        """Files a batch of jobs, then settles each; returns seconds to pause fetching.

        Jobs that arrive together are filed together: their raw messages and attachments
        travel in one StoreDeliveries call, which makes them durable with one group commit
        and files every copy in one transaction. Each job is still settled on its own.
        """
        keepalive = asyncio.create_task(self._keep_alive(msgs))
        try:
            units: list[list[Filing]] = []  # the jobs of each message
            self._batch = Batch()
            for msg in msgs:
                unit = [await self._prepare(msg, job) for job in await self._jobs(msg)]
                if unit:
                    units.append(unit)
            await self._store(self._batch)
            pause = 0.0
            for unit in units:
                pause = max(pause, await self._settle(unit))
            return pause
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _jobs(self, msg: Msg) -> list[delivery_pb2.InboundJob]:
        """The jobs a message carries; none for a poison message (dead-lettered now)."""
        try:
            return decode_jobs(msg.data, msg.headers)
        except PoisonJob as err:
            log.error("%s: poison message %s: %s", self.name, bus.stream_seq(msg), err)
            await self._give_up(msg, str(err), _attempts(msg), err.blob_key)
            return []

    async def _prepare(self, msg: Msg, job: delivery_pb2.InboundJob) -> Filing:
        """Reads, parses and checks one job and adds its copies to the batch."""
        filing = Filing(msg, job, _attempts(msg))
        try:
            await self._add_copies(filing)
        except JobFailed as err:
            filing.failed = str(err)
        except MailgridError as err:
            # Copies already in the batch may still be stored: the job is retried, and
            # their delivery keys make the retry's copies no-ops.
            filing.report.temporary.extend((rcpt, err) for rcpt in job.rcpt_to)
        except Exception as err:  # a bug must not lose mail or kill the worker
            log.exception("%s: job %s failed", self.name, job.queue_id)
            filing.report.temporary.extend((rcpt, MailgridError(repr(err)))
                                           for rcpt in job.rcpt_to)
        return filing

    async def _add_copies(self, filing: Filing) -> None:
        """One StoreDeliveryRequest per recipient into the batch; refusals in the report."""
        job = filing.job
        raw = await self._raw(job)
        parsed = await parse_raw(self.settings, raw)
        checks = await self.checks.evaluate(job, raw)
        # The bytes the copies need stored with them, each named once: the raw message by
        # its job (metadata_svc hashes what it stores; a second sha256 here cost 60 us
        # per 100 KB), attachments by the content address their listing shows.
        carried: list[tuple[str, bytes]] = []
        if job.blob_key:  # a large message: its bytes and attachments stream separately
            await store_attachments(self.metadata, parsed)
        else:
            carried.append((f"raw of {job.queue_id}", raw))
            for attachment, data in iter_attachments(parsed):
                attachment.blob_key = hashlib.sha256(data).hexdigest()
                carried.append((attachment.blob_key, data))
        del raw
        filed = _bodies_in_raw(parsed.message)
        seen_users: set[str] = set()
        for rcpt in job.rcpt_to:
            try:
                request = await self._request(job, rcpt, parsed, filed, seen_users, checks)
            except (NotFound, InvalidArgument) as err:
                filing.report.permanent.append((rcpt, _refusal(rcpt, err)))
            except MailgridError as err:
                filing.report.temporary.append((rcpt, err))
            else:
                if request is not None:
                    await self._add_copy(filing, rcpt, request, carried)

    async def _add_copy(self, filing: Filing, rcpt: str,
                        request: metadata_pb2.StoreDeliveryRequest,
                        carried: list[tuple[str, bytes]]) -> None:
        """Adds one copy and its bytes (each once per batch); a full batch is stored first,
        so no call passes BATCH_BYTES by more than one copy."""
        copy = metadata_pb2.BatchedDelivery(request=request)
        if self._batch.deliveries and self._batch.size + copy.ByteSize() + sum(
                len(data) for _, data in carried) > BATCH_BYTES:
            await self._store(self._batch)
            self._batch = Batch()
        indexes = [self._batch.add_blob(key, data) for key, data in carried]
        if indexes:
            copy.blob_index = indexes[0]  # the raw message comes first
        self._batch.add_delivery(filing, rcpt, copy)

    async def _raw(self, job: delivery_pb2.InboundJob) -> bytes:
        if not job.blob_key:
            return job.raw
        try:
            return await self.metadata.get_blob(job.blob_key)
        except NotFound as err:
            raise JobFailed(f"raw message {job.blob_key} is not in the blob store") from err

    async def _request(self, job: delivery_pb2.InboundJob, rcpt: str, parsed: ParsedEmail,
                       filed: metadata_pb2.ParsedMessage, seen_users: set[str],
                       checks: JobChecks) -> metadata_pb2.StoreDeliveryRequest | None:
        """One recipient's copy to store (None if its mailbox has one already): ``parsed``
        is what the checks read, ``filed`` what the store keeps."""
        user = await self.users.by_address(rcpt)
        if user.user_id in seen_users:
            return None  # two addresses of one mailbox: one copy
        seen_users.add(user.user_id)
        lists = await self._sender_lists(user.user_id) if checks.external else []
        folder, verdict = self.checks.decide(checks, parsed.message, lists)
        if checks.virus:
            await self._notify_virus(job, rcpt, user.user_id, parsed, checks.virus)
        request = metadata_pb2.StoreDeliveryRequest(
            user_id=user.user_id, delivery_key=delivery_key(job.queue_id, rcpt),
            folder_id=folder, blob_key=job.blob_key, size=job.size,
            parsed=filed, checks=verdict)
        if job.HasField("received_at"):
            request.received_at.CopyFrom(job.received_at)
        return request

    async def _store(self, batch: Batch) -> None:
        """Stores the batch and records each copy's outcome in its job's report."""
        if not batch.deliveries:
            return
        outcomes: list[metadata_pb2.StoreDeliveryResponse | MailgridError]
        try:
            outcomes = await self.metadata.store_deliveries(batch.blobs, batch.deliveries)
        except MailgridError as err:
            outcomes = [err] * len(batch.deliveries)
        except Exception as err:
            log.exception("%s: storing a batch failed", self.name)
            outcomes = [MailgridError(repr(err))] * len(batch.deliveries)
        for (filing, rcpt), outcome in zip(batch.copies, outcomes, strict=True):
            if isinstance(outcome, NotFound | InvalidArgument):
                filing.report.permanent.append((rcpt, _refusal(rcpt, outcome)))
            elif isinstance(outcome, MailgridError):
                filing.report.temporary.append((rcpt, outcome))
            else:
                filing.report.stored.append(rcpt)
                log.debug("%s: %s → %s email %s (new: %s)", self.name, filing.job.queue_id,
                          rcpt, outcome.email_id, outcome.created)

    async def _settle(self, unit: list[Filing]) -> float:
        """Acks (or retries) one message once each of its jobs is filed or given up."""
        msg, attempts = unit[0].msg, unit[0].attempts
        last = attempts >= self.settings.inbound_max_deliver > 0
        retry = [filing for filing in unit if filing.report.temporary and not filing.failed]
        if retry and not last:
            # The whole message comes back; its stored copies are repeats then, which
            # the delivery keys turn into no-ops.
            return await self._retry(msg, retry[0].job, retry[0].report, attempts)
        settled = True
        for filing in unit:
            settled &= await self._give_up_on(filing, attempts)
        if not settled:
            await self._nak(msg, attempts)
            return 0.0
        if any(filing.failed or filing.report.temporary for filing in unit):
            await msg.term()
        else:
            await msg.ack()
        return 0.0

    async def _give_up_on(self, filing: Filing, attempts: int) -> bool:
        """Dead-letters what of a job could not be filed; False if DEAD is unreachable."""
        job, report = filing.job, filing.report
        if filing.failed:
            letter = _dead_letter(filing.msg, job.SerializeToString(), filing.failed,
                                  attempts, job.blob_key)
            return await self._publish_dead(letter, f"dead-inbound-{job.queue_id}")
        failures = report.permanent + [
            (rcpt, f"gave up after {attempts} attempts: {err.detail}")
            for rcpt, err in report.temporary]
        if not await self._dead_letter_recipients(filing.msg, job, failures, attempts):
            return False
        log.info("%s: job %s filed for %d recipient(s), %d dead-lettered", self.name,
                 job.queue_id, len(report.stored), len(failures))
        return True

    async def _retry(self, msg: Msg, job: delivery_pb2.InboundJob, report: Report,
                     attempts: int) -> float:
        delay = await self._nak(msg, attempts)
        rcpt, err = report.temporary[0]
        log.warning("%s: job %s attempt %d failed for %s (%s: %s); retry in %.1fs",
                    self.name, job.queue_id, attempts, rcpt, type(err).__name__,
                    err.detail, delay)
        system_down = any(isinstance(e, Unavailable | StorageFull) for _, e in report.temporary)
        return delay if system_down else 0.0

    async def _sender_lists(self, user_id: str) -> list[common_pb2.SenderListEntry]:
        """The user's allow/block lists, read once per batch; advisory, so a store that
        cannot give them (not an outage: that is retried) means no lists rather than
        undelivered mail."""
        batch = self._batch
        if user_id in batch.sender_lists:
            return batch.sender_lists[user_id]
        try:
            lists = await self.metadata.sender_lists(user_id)
        except (Unavailable, StorageFull):
            raise
        except MailgridError as err:
            log.warning("%s: no sender lists for %s: %s", self.name, user_id, err.detail)
            lists = []
        batch.sender_lists[user_id] = lists
        return lists

    async def _notify_virus(self, job: delivery_pb2.InboundJob, rcpt: str, user_id: str,
                            parsed: ParsedEmail, virus: str) -> None:
        """A short notice in the inbox: the message itself is quarantined in Spam."""
        notice = virus_notice(self.settings, rcpt, job.mail_from, parsed.message, virus)
        stored = await self.metadata.put_blob(notice)
        notice_parsed = await parse_raw(self.settings, notice)
        req = metadata_pb2.StoreDeliveryRequest(
            user_id=user_id, delivery_key=f"{delivery_key(job.queue_id, rcpt)}:virus-notice",
            folder_id="inbox", blob_key=stored.blob_key, size=stored.size,
            parsed=notice_parsed.message)
        await self.metadata.store_delivery(req)

    # settling

    async def _keep_alive(self, msgs: list[Msg]) -> None:
        """Tells NATS the jobs are still being worked on, so they are not redelivered
        meanwhile."""
        interval = max(self.settings.inbound_ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _nak(self, msg: Msg, attempts: int) -> float:
        delay = float(min(self.settings.inbound_retry_delay * 2 ** max(attempts - 1, 0),
                          self.settings.inbound_retry_max_delay))
        try:
            await msg.nak(delay=delay)
        except Exception as err:  # lost connection: NATS redelivers after ack_wait anyway
            log.warning("%s: could not nak %s: %s", self.name, bus.stream_seq(msg), err)
        return delay

    async def _give_up(self, msg: Msg, reason: str, attempts: int, blob_key: str) -> None:
        """Moves the whole message to DEAD, then terminates it (nak if DEAD is unreachable)."""
        letter = _dead_letter(msg, msg.data, reason, attempts, blob_key)
        if await self._publish_dead(letter, f"dead-inbound-{bus.stream_seq(msg)}"):
            await msg.term()
        else:
            await self._nak(msg, attempts)

    async def _dead_letter_recipients(self, msg: Msg, job: delivery_pb2.InboundJob,
                                      failures: list[tuple[str, str]], attempts: int) -> bool:
        """One DeadLetter per failed recipient, its payload the job for that recipient only,
        so an operator can republish it as it is."""
        for rcpt, reason in failures:
            single = delivery_pb2.InboundJob()
            single.CopyFrom(job)
            del single.rcpt_to[:]
            single.rcpt_to.append(rcpt)
            letter = _dead_letter(msg, single.SerializeToString(), reason, attempts,
                                  job.blob_key)
            msg_id = f"dead-inbound-{job.queue_id}-{rcpt.lower()}"
            if not await self._publish_dead(letter, msg_id):
                return False
            log.warning("%s: job %s: %s (dead-lettered)", self.name, job.queue_id, reason)
        return True

    async def _publish_dead(self, letter: delivery_pb2.DeadLetter, msg_id: str) -> bool:
        try:
            await bus.publish(self.js, DEAD_SUBJECT, letter.SerializeToString(), msg_id)
        except Unavailable as err:
            log.error("%s: could not dead-letter (%s): %s", self.name, letter.reason, err)
            return False
        return True


def _dead_letter(msg: Msg, payload: bytes, reason: str, attempts: int,
                 blob_key: str) -> delivery_pb2.DeadLetter:
    letter = delivery_pb2.DeadLetter(stream=STREAM, subject=msg.subject, payload=payload,
                                     reason=reason, attempts=attempts, blob_key=blob_key)
    letter.failed_at.GetCurrentTime()
    return letter


def _attempts(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


