"""Inbound runner: files each accepted SMTP transaction into its recipients' mailboxes.

A durable JetStream pull consumer on INBOUND. For each job: fetch the raw message from
the blob store, parse it (mailgrid.mime never fails), store the attachments' bytes
(content-addressed), then one StoreDelivery per recipient, idempotent on
``queue_id:recipient`` so a redelivered job never duplicates mail. The job is acked only
after every recipient is stored.

Outcomes map to acks (DESIGN.md, nats.py examples):
- all stored → ack();
- a temporary failure (metadata_svc down, mailbox full, anything unexpected) → nak with
  an exponentially growing delay;
- a recipient that does not exist → a DeadLetter for that recipient, the others stored;
- the last allowed delivery failing, or a payload that cannot be read → DeadLetter on
  mail.dead.inbound (the raw bytes stay in the blob store), then term(). Nothing is ever
  dropped: if even the DeadLetter cannot be published, the job is nak'ed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from mailgrid.mime import ParsedEmail
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2, metadata_pb2

log = logging.getLogger(__name__)

STREAM = "INBOUND"
DURABLE = "inbound-workers"
DEAD_SUBJECT = f"{bus.DEAD_PREFIX}.inbound"
# Seconds one fetch waits for a job; bounds how long a stop waits for an idle worker.
FETCH_TIMEOUT = 1.0


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


def decode_job(data: bytes) -> delivery_pb2.InboundJob:
    """The InboundJob in ``data``; PoisonJob if it is not one that can be processed."""
    try:
        job = delivery_pb2.InboundJob.FromString(data)
    except (DecodeError, ValueError) as err:
        raise PoisonJob(f"payload is not an InboundJob: {err}") from err
    missing = [name for name, value in (("queue_id", job.queue_id),
                                        ("blob_key", job.blob_key),
                                        ("rcpt_to", list(job.rcpt_to))) if not value]
    if missing:
        raise PoisonJob(f"InboundJob without {', '.join(missing)}", job.blob_key)
    return job


def delivery_key(queue_id: str, rcpt: str) -> str:
    return f"{queue_id}:{rcpt.lower()}"


class InboundWorker:
    """One worker: fetches one job at a time from the shared durable consumer."""

    def __init__(self, settings: Settings, js: JetStreamContext, metadata: MetadataClient,
                 name: str = "inbound", checks: InboundChecks | None = None) -> None:
        self.settings = settings
        self.checks = checks or InboundChecks(settings)
        self.js = js
        self.metadata = metadata
        self.name = name
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        try:
            self._sub = await self.js.pull_subscribe_bind(consumer=DURABLE, stream=STREAM)
        except Exception as err:
            raise Unavailable(f"cannot bind to consumer {DURABLE}: {err}") from err

    async def run(self, stop: asyncio.Event) -> None:
        """Fetches and handles jobs until ``stop`` is set; the job in hand is finished."""
        if self._sub is None:
            await self.subscribe()
        assert self._sub is not None
        async for msgs in bus.fetch_until(self._sub, stop, batch=1, timeout=FETCH_TIMEOUT,
                                          name=self.name):
            for msg in msgs:
                try:
                    pause = await self.handle(msg)
                except Exception:  # e.g. the ack was lost with the connection: NATS
                    # redelivers after ack_wait and the delivery key keeps it single.
                    log.exception("%s: could not settle message %s", self.name,
                                  bus.stream_seq(msg))
                    pause = 1.0
                if pause:  # a dependency is down: let it recover before the next job
                    await bus.sleep_unless(stop, pause)

    async def handle(self, msg: Msg) -> float:
        """Processes one message and settles it; returns seconds to pause fetching."""
        attempts = _attempts(msg)
        try:
            job = decode_job(msg.data)
        except PoisonJob as err:
            log.error("%s: poison message %s: %s", self.name, bus.stream_seq(msg), err)
            await self._give_up(msg, str(err), attempts, err.blob_key)
            return 0.0
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            return await self._settle(msg, job, attempts)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _settle(self, msg: Msg, job: delivery_pb2.InboundJob, attempts: int) -> float:
        try:
            report = await self.deliver(job)
        except JobFailed as err:
            await self._give_up(msg, str(err), attempts, job.blob_key)
            return 0.0
        except MailgridError as err:
            report = Report(temporary=[(rcpt, err) for rcpt in job.rcpt_to])
        except Exception as err:  # a bug must not lose mail or kill the worker
            log.exception("%s: job %s failed", self.name, job.queue_id)
            report = Report(temporary=[(rcpt, MailgridError(repr(err)))
                                       for rcpt in job.rcpt_to])
        last = attempts >= self.settings.inbound_max_deliver > 0
        if report.temporary and not last:
            return await self._retry(msg, job, report, attempts)
        failures = report.permanent + [
            (rcpt, f"gave up after {attempts} attempts: {err.detail}")
            for rcpt, err in report.temporary]
        if not await self._dead_letter_recipients(msg, job, failures, attempts):
            await self._nak(msg, attempts)
            return 0.0
        if report.temporary:
            await msg.term()
        else:
            await msg.ack()
        log.info("%s: job %s filed for %d recipient(s), %d dead-lettered", self.name,
                 job.queue_id, len(report.stored), len(failures))
        return 0.0

    async def _retry(self, msg: Msg, job: delivery_pb2.InboundJob, report: Report,
                     attempts: int) -> float:
        delay = await self._nak(msg, attempts)
        rcpt, err = report.temporary[0]
        log.warning("%s: job %s attempt %d failed for %s (%s: %s); retry in %.1fs",
                    self.name, job.queue_id, attempts, rcpt, type(err).__name__,
                    err.detail, delay)
        system_down = any(isinstance(e, Unavailable | StorageFull) for _, e in report.temporary)
        return delay if system_down else 0.0

    # the work

    async def deliver(self, job: delivery_pb2.InboundJob) -> Report:
        """Files ``job`` for every recipient; raises only for job-wide failures."""
        try:
            raw = await self.metadata.get_blob(job.blob_key)
        except NotFound as err:
            raise JobFailed(f"raw message {job.blob_key} is not in the blob store") from err
        parsed = await parse_raw(self.settings, raw)
        checks = await self.checks.evaluate(job, raw)
        del raw
        await store_attachments(self.metadata, parsed)
        report = Report()
        seen_users: set[str] = set()
        for rcpt in job.rcpt_to:
            try:
                user_id = await self._file(job, rcpt, parsed, seen_users, checks)
            except (NotFound, InvalidArgument) as err:
                reason = (f"unknown recipient <{rcpt}>" if isinstance(err, NotFound)
                          else f"recipient <{rcpt}> refused: {err.detail}")
                report.permanent.append((rcpt, reason))
            except MailgridError as err:
                report.temporary.append((rcpt, err))
            else:
                if user_id:
                    report.stored.append(rcpt)
        return report

    async def _file(self, job: delivery_pb2.InboundJob, rcpt: str, parsed: ParsedEmail,
                    seen_users: set[str], checks: JobChecks) -> str:
        """Stores one recipient's copy; returns the user id ('' if already filed now)."""
        user = await self.metadata.get_user(address=rcpt)
        if user.user_id in seen_users:
            return ""  # two addresses of one mailbox: one copy
        seen_users.add(user.user_id)
        lists = await self._sender_lists(user.user_id) if checks.external else []
        folder, verdict = self.checks.decide(checks, parsed.message, lists)
        if checks.virus:
            await self._notify_virus(job, rcpt, user.user_id, parsed, checks.virus)
        req = metadata_pb2.StoreDeliveryRequest(
            user_id=user.user_id, delivery_key=delivery_key(job.queue_id, rcpt),
            folder_id=folder, blob_key=job.blob_key, size=job.size,
            parsed=parsed.message, checks=verdict)
        if job.HasField("received_at"):
            req.received_at.CopyFrom(job.received_at)
        reply = await self.metadata.store_delivery(req)
        log.debug("%s: %s → %s email %s (new: %s)", self.name, job.queue_id, rcpt,
                  reply.email_id, reply.created)
        return user.user_id

    async def _sender_lists(self, user_id: str) -> list[common_pb2.SenderListEntry]:
        """The user's allow/block lists; advisory, so a store that cannot give them
        (not an outage: that is retried) means no lists rather than undelivered mail."""
        try:
            return await self.metadata.sender_lists(user_id)
        except (Unavailable, StorageFull):
            raise
        except MailgridError as err:
            log.warning("%s: no sender lists for %s: %s", self.name, user_id, err.detail)
            return []

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

    async def _keep_alive(self, msg: Msg) -> None:
        """Tells NATS the job is still being worked on, so it is not redelivered meanwhile."""
        interval = max(self.settings.inbound_ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
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


