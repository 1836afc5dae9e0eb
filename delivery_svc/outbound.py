"""Outbound runner: delivers queued mail to remote mail exchangers over SMTP.

A durable JetStream pull consumer on OUTBOUND (``mail.outbound.<domain>``), shared by
every worker of every delivery_svc instance. For each OutboundJob: fetch the raw message
from the blob store, DKIM-sign it when its From domain has a key, find the targets
(routes, MX, A/AAAA), and run one SMTP transaction for the job's recipients.

Outcomes per recipient (RFC 5321 4.2.1) and what the job does with them:
- 2xx delivered; 5xx failed for good; 4xx, no connection or a DNS failure deferred.
- Failed (and deferred ones once the job is older than ``outbound_max_lifetime``): a DSN
  (RFC 3464) filed in the sender's Inbox, unless the sender is the null sender, and a
  DeadLetter on mail.dead.outbound with the job for those recipients only.
- All deferred: nak(delay) with exponential backoff; the attempt count and last error
  go to the state bucket (delivery_svc.outbound_state) for `mailgrid queue`.
- Some deferred after others were done: a new job for the deferred ones only (id
  derived from the old one, so a repeated publish is stored once; not_before set to the
  backoff), then the old one is acked. A delivery that succeeded is never repeated,
  except when the worker dies between the remote's 250 and the ack (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from delivery_svc.dkim_sign import DkimSigner
from delivery_svc.dsn import Report, build_dsn
from delivery_svc.outbound_state import JobState, StateStore
from delivery_svc.routing import RouteError, Router
from delivery_svc.smtp_out import (
    Outcome,
    RcptResult,
    SmtpSender,
    defer_all,
    fail_all,
    one_line,
)
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import MailgridError, NotFound, Unavailable
from mailgrid.filing import parse_raw, store_attachments
from mailgrid.settings import Settings
from mailgrid.v1 import delivery_pb2, metadata_pb2

log = logging.getLogger(__name__)

STREAM = "OUTBOUND"
DURABLE = "outbound-workers"
SUBJECTS = f"{bus.OUTBOUND_PREFIX}.>"
DEAD_SUBJECT = f"{bus.DEAD_PREFIX}.outbound"
FETCH_TIMEOUT = 1.0
# Bytes of raw messages kept in memory per process for jobs that share one.
BLOB_CACHE_BYTES = 16 * 1024 * 1024
# Seconds to wait before trying a job again when our own metadata_svc is unavailable.
DEPENDENCY_RETRY = 5.0
# A job id re-published by us ends in +a<attempt> (deferred rest) or +r<hex> (retry).
_DERIVED = re.compile(r"\+[ar][0-9a-f]+$")


def outbound_subject(domain: str) -> str:
    return f"{bus.OUTBOUND_PREFIX}.{domain.lower()}"


def root_job_id(job_id: str) -> str:
    return _DERIVED.sub("", job_id)


def derived_job_id(job_id: str, tag: str) -> str:
    """The id of a job re-published from ``job_id``: deterministic for a given tag."""
    return f"{root_job_id(job_id)}+{tag}"


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds before the next try after ``attempt`` failed ones (Postfix-like doubling)."""
    delay = settings.outbound_retry_delay * 2 ** max(attempt - 1, 0)
    return float(min(delay, settings.outbound_retry_max_delay))


def consumer_config(settings: Settings) -> ConsumerConfig:
    # Deferred jobs stay unacknowledged until they are due, so the ack-pending window
    # must hold all of them; the redelivery schedule is the worker's nak(delay).
    return ConsumerConfig(
        name=DURABLE,
        durable_name=DURABLE,
        filter_subject=SUBJECTS,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.outbound_ack_wait,
        max_deliver=-1,
        max_ack_pending=-1,
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings) -> None:
    try:
        await js.add_consumer(STREAM, consumer_config(settings))
    except Exception as err:  # nats raises several unrelated types here
        raise Unavailable(f"cannot create consumer {DURABLE} on {STREAM}: {err}") from err


class PoisonJob(Exception):
    """A payload that is not an OutboundJob that can be delivered."""


def decode_job(data: bytes) -> delivery_pb2.OutboundJob:
    try:
        job = delivery_pb2.OutboundJob.FromString(data)
    except (DecodeError, ValueError) as err:
        raise PoisonJob(f"payload is not an OutboundJob: {err}") from err
    missing = [name for name, value in (("job_id", job.job_id), ("blob_key", job.blob_key),
                                        ("domain", job.domain),
                                        ("rcpt_to", list(job.rcpt_to))) if not value]
    if missing:
        raise PoisonJob(f"OutboundJob without {', '.join(missing)}")
    return job


class BlobCache:
    """Recently sent raw messages by blob key: one message to many domains is one job per
    domain, and blob keys are content addresses, so a cached copy is never stale."""

    def __init__(self, max_bytes: int = BLOB_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4 or key in self._items:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


@dataclass
class Attempt:
    """The results of one try, split by outcome."""

    delivered: list[RcptResult] = field(default_factory=list)
    deferred: list[RcptResult] = field(default_factory=list)
    failed: list[RcptResult] = field(default_factory=list)
    original: bytes | None = None

    @classmethod
    def of(cls, results: list[RcptResult], original: bytes | None) -> Attempt:
        attempt = cls(original=original)
        for r in results:
            {Outcome.DELIVERED: attempt.delivered, Outcome.DEFERRED: attempt.deferred,
             Outcome.FAILED: attempt.failed}[r.outcome].append(r)
        return attempt


class OutboundWorker:
    """One worker: one job, one SMTP connection at a time."""

    def __init__(self, settings: Settings, js: JetStreamContext, metadata: MetadataClient,
                 state: StateStore, name: str = "outbound",
                 blobs: BlobCache | None = None) -> None:
        self.settings = settings
        self.blobs = blobs or BlobCache()
        self.js = js
        self.metadata = metadata
        self.state = state
        self.name = name
        self.router = Router(settings)
        self.sender = SmtpSender(settings)
        self.signer = DkimSigner(settings.dkim_dir, settings.dkim_selector)
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        try:
            self._sub = await self.js.pull_subscribe_bind(consumer=DURABLE, stream=STREAM)
        except Exception as err:
            raise Unavailable(f"cannot bind to consumer {DURABLE}: {err}") from err

    async def run(self, stop: asyncio.Event) -> None:
        """Fetches and delivers jobs until ``stop`` is set; the job in hand is finished."""
        if self._sub is None:
            await self.subscribe()
        assert self._sub is not None
        async for msgs in bus.fetch_until(self._sub, stop, batch=1, timeout=FETCH_TIMEOUT,
                                          name=self.name):
            for msg in msgs:
                try:
                    pause = await self.handle(msg)
                except Exception:  # the ack was lost: NATS redelivers after ack_wait
                    log.exception("%s: could not settle message %s", self.name,
                                  bus.stream_seq(msg))
                    pause = 1.0
                if pause:  # a dependency is down: let it recover before the next job
                    await bus.sleep_unless(stop, pause)

    async def handle(self, msg: Msg) -> float:
        """Delivers one job and settles its message; returns seconds to pause fetching."""
        try:
            job = decode_job(msg.data)
        except PoisonJob as err:
            log.error("%s: poison message %s: %s", self.name, bus.stream_seq(msg), err)
            letter = _dead_letter(msg.subject, msg.data, str(err), _delivered(msg), "")
            if await self._publish_dead(letter, f"dead-outbound-seq-{bus.stream_seq(msg)}"):
                await msg.term()
            else:
                await msg.nak(delay=DEPENDENCY_RETRY)
            return 0.0
        wait = _not_due_for(job)
        if wait > 0:  # a re-published job that is not due yet: no attempt now
            await msg.nak(delay=wait)
            return 0.0
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            return await self._settle(msg, job)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    # one attempt

    async def attempt(self, job: delivery_pb2.OutboundJob, rcpts: list[str]) -> Attempt:
        """Tries to deliver to ``rcpts``; Unavailable if our own blob store is down."""
        raw = self.blobs.get(job.blob_key)
        if raw is None:
            try:
                raw = await self.metadata.get_blob(job.blob_key)
            except NotFound:
                return Attempt.of(fail_all(rcpts, "5.3.0", f"the message ({job.blob_key}) "
                                           "is no longer in the blob store"), None)
            self.blobs.put(job.blob_key, raw)
        data = await self.signer.sign_async(raw, job.mail_from.rpartition("@")[2])
        try:
            targets = await self.router.targets(job.domain)
        except RouteError as err:
            make = fail_all if err.permanent else defer_all
            return Attempt.of(make(rcpts, err.status, err.reason), raw)
        results = await self.sender.send(targets, job.mail_from, rcpts, data)
        return Attempt.of(results, raw)

    # settling

    async def _settle(self, msg: Msg, job: delivery_pb2.OutboundJob) -> float:
        seq = _stream_seq(msg)
        state = await self.state.get(seq) if _delivered(msg) > 1 else None
        attempt_no = (state.attempts if state else job.previous_attempts) + 1
        done = set(state.done) if state else set()
        rcpts = [r for r in dict.fromkeys(job.rcpt_to) if r not in done]
        if not rcpts:  # an earlier attempt did all; only its settling was lost
            await msg.ack()
            await self.state.delete(seq)
            return 0.0
        try:
            result = await self.attempt(job, rcpts)
        except Unavailable as err:
            log.warning("%s: job %s waits for metadata_svc: %s", self.name, job.job_id, err)
            await msg.nak(delay=DEPENDENCY_RETRY)
            return DEPENDENCY_RETRY
        if result.deferred and _expired(self.settings, job):
            result.failed += [_expired_result(r) for r in result.deferred]
            result.deferred = []
        done |= {r.rcpt for r in result.delivered}
        self._log(job, attempt_no, result)
        if result.failed and not await self._report_failures(job, result, attempt_no):
            # The DSN or dead letter must exist before the job goes: try again soon,
            # remembering who already has the message.
            await self.state.put(seq, _state(job, state, attempt_no, result, done,
                                             time.time() + DEPENDENCY_RETRY))
            await msg.nak(delay=DEPENDENCY_RETRY)
            return DEPENDENCY_RETRY
        if not result.deferred:
            await msg.ack()
        elif result.delivered or result.failed:
            if not await self._requeue_rest(msg, job, attempt_no, result):
                await self.state.put(seq, _state(job, state, attempt_no, result, done,
                                                 time.time() + DEPENDENCY_RETRY))
                await msg.nak(delay=DEPENDENCY_RETRY)
                return DEPENDENCY_RETRY
        else:
            await self._defer(msg, job, state, attempt_no, result, done)
            return 0.0
        if state is not None:
            await self.state.delete(seq)
        return 0.0

    async def _defer(self, msg: Msg, job: delivery_pb2.OutboundJob, state: JobState | None,
                     attempt_no: int, result: Attempt, done: set[str]) -> None:
        delay = backoff(self.settings, attempt_no)
        new_state = _state(job, state, attempt_no, result, done, time.time() + delay)
        new_state.warned = await self._maybe_warn(job, new_state, result)
        await self.state.put(_stream_seq(msg), new_state)
        await msg.nak(delay=delay)

    async def _requeue_rest(self, msg: Msg, job: delivery_pb2.OutboundJob, attempt_no: int,
                            result: Attempt) -> bool:
        """A new job for the deferred recipients only; then the old one is acked.

        False if the new job could not be published (the old one then stays).
        """
        rest = delivery_pb2.OutboundJob()
        rest.CopyFrom(job)
        rest.job_id = derived_job_id(job.job_id, f"a{attempt_no:x}")
        del rest.rcpt_to[:]
        rest.rcpt_to.extend(r.rcpt for r in result.deferred)
        rest.previous_attempts = attempt_no
        rest.last_error = result.deferred[0].diagnostic
        due = time.time() + backoff(self.settings, attempt_no)
        rest.not_before.FromNanoseconds(int(due * 1e9))
        try:
            await bus.publish(self.js, msg.subject, rest.SerializeToString(), rest.job_id)
        except Unavailable as err:
            log.error("%s: cannot re-queue the rest of %s: %s", self.name, job.job_id, err)
            return False
        await msg.ack()
        return True

    async def _report_failures(self, job: delivery_pb2.OutboundJob, result: Attempt,
                               attempt_no: int) -> bool:
        """The DSN (never for the null sender) and the dead letter; False to retry later."""
        if job.mail_from and job.sender_user_id:
            try:
                await self._file_dsn(job, result, "failed", f"dsn:{job.job_id}")
            except MailgridError as err:
                if not isinstance(err, NotFound):
                    log.warning("%s: cannot file the DSN of %s: %s", self.name, job.job_id,
                                err.detail)
                    return False
                log.error("%s: sender %s of %s is gone; no DSN", self.name,
                          job.sender_user_id, job.job_id)
        dead = delivery_pb2.OutboundJob()
        dead.CopyFrom(job)
        del dead.rcpt_to[:]
        dead.rcpt_to.extend(r.rcpt for r in result.failed)
        dead.last_error = result.failed[0].diagnostic
        dead.previous_attempts = attempt_no
        reason = "; ".join(f"<{r.rcpt}>: {r.status} {r.diagnostic}" for r in result.failed)
        letter = _dead_letter(f"{bus.OUTBOUND_PREFIX}.{job.domain}", dead.SerializeToString(),
                              reason, attempt_no, job.blob_key)
        return await self._publish_dead(letter, f"dead-outbound-{job.job_id}")

    async def _maybe_warn(self, job: delivery_pb2.OutboundJob, state: JobState,
                          result: Attempt) -> bool:
        """One "delayed" notice per message once it has waited outbound_delay_warning."""
        warning = self.settings.outbound_delay_warning
        if state.warned or warning <= 0 or not (job.mail_from and job.sender_user_id):
            return state.warned
        if time.time() - _queued_at(job) < warning:
            return False
        try:
            await self._file_dsn(job, Attempt(deferred=result.deferred,
                                              original=result.original),
                                 "delayed", f"dsn-delayed:{root_job_id(job.job_id)}")
        except MailgridError as err:
            log.warning("%s: cannot file the delay notice of %s: %s", self.name, job.job_id,
                        err.detail)
            return False
        return True

    async def _file_dsn(self, job: delivery_pb2.OutboundJob, result: Attempt, action: str,
                        key: str) -> None:
        settings = self.settings
        lifetime_end = datetime.fromtimestamp(_queued_at(job) + settings.outbound_max_lifetime,
                                              UTC)
        report = Report(
            reporting_mta=settings.server_name, postmaster_domain=settings.domains[0],
            sender=job.mail_from, job_id=job.job_id,
            arrival=datetime.fromtimestamp(_queued_at(job), UTC),
            results=result.failed if action == "failed" else result.deferred,
            original=result.original, action=action,
            will_retry_until=lifetime_end if action == "delayed" else None)
        raw = build_dsn(report)
        parsed = await parse_raw(settings, raw)
        await store_attachments(self.metadata, parsed)  # the original's headers part
        stored = await self.metadata.put_blob(raw)
        req = metadata_pb2.StoreDeliveryRequest(
            user_id=job.sender_user_id, delivery_key=key, folder_id="inbox",
            blob_key=stored.blob_key, size=len(raw), parsed=parsed.message)
        req.received_at.GetCurrentTime()
        reply = await self.metadata.store_delivery(req)
        log.info("%s: %s DSN for job %s filed for user %s (new: %s)", self.name, action,
                 job.job_id, job.sender_user_id, reply.created)

    async def _publish_dead(self, letter: delivery_pb2.DeadLetter, msg_id: str) -> bool:
        try:
            await bus.publish(self.js, DEAD_SUBJECT, letter.SerializeToString(), msg_id)
        except Unavailable as err:
            log.error("%s: could not dead-letter (%s): %s", self.name, letter.reason, err)
            return False
        return True

    async def _keep_alive(self, msg: Msg) -> None:
        """Tells NATS the job is still being worked on (a slow remote), so it stays ours."""
        interval = max(self.settings.outbound_ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    def _log(self, job: delivery_pb2.OutboundJob, attempt_no: int, result: Attempt) -> None:
        for r in result.delivered:
            log.info("%s: job %s to <%s>: delivered via %s (%s)", self.name, job.job_id,
                     r.rcpt, r.remote_mta, r.diagnostic)
        for r in result.deferred:
            log.warning("%s: job %s to <%s>: deferred (attempt %d): %s", self.name,
                        job.job_id, r.rcpt, attempt_no, r.diagnostic)
        for r in result.failed:
            log.warning("%s: job %s to <%s>: failed: %s %s", self.name, job.job_id, r.rcpt,
                        r.status, r.diagnostic)


def _state(job: delivery_pb2.OutboundJob, old: JobState | None, attempt_no: int,
           result: Attempt, done: set[str], next_attempt: float) -> JobState:
    errors = result.deferred or result.failed
    return JobState(job_id=job.job_id, attempts=attempt_no,
                    last_error=errors[0].diagnostic if errors else "",
                    next_attempt=next_attempt, done=sorted(done),
                    warned=old.warned if old else False)


def _expired(settings: Settings, job: delivery_pb2.OutboundJob) -> bool:
    return time.time() - _queued_at(job) > settings.outbound_max_lifetime


def _expired_result(result: RcptResult) -> RcptResult:
    # RFC 3463 4.4.7: delivery time expired; the last remote reply stays the diagnostic.
    return RcptResult(result.rcpt, Outcome.FAILED, "4.4.7",
                      one_line(result.diagnostic), result.remote_mta, result.smtp_reply)


def _queued_at(job: delivery_pb2.OutboundJob) -> float:
    if job.HasField("queued_at"):
        return float(job.queued_at.seconds + job.queued_at.nanos / 1e9)
    return time.time()


def _not_due_for(job: delivery_pb2.OutboundJob) -> float:
    """Seconds until a re-published job's not_before (0 when due)."""
    if not job.HasField("not_before"):
        return 0.0
    stamp = job.not_before
    return max(0.0, float(stamp.seconds + stamp.nanos / 1e9 - time.time()))


def _dead_letter(subject: str, payload: bytes, reason: str, attempts: int,
                 blob_key: str) -> delivery_pb2.DeadLetter:
    letter = delivery_pb2.DeadLetter(stream=STREAM, subject=subject, payload=payload,
                                     reason=reason, attempts=attempts, blob_key=blob_key)
    letter.failed_at.GetCurrentTime()
    return letter


def _delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


def _stream_seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)




async def start_workers(settings: Settings, js: JetStreamContext, metadata: MetadataClient,
                        stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """The consumer, the state bucket and ``outbound_workers`` running workers (0: none)."""
    if settings.outbound_workers <= 0:
        return []
    Router(settings)  # a bad route or nameserver setting fails the start, not each job
    await ensure_consumer(js, settings)
    state = await StateStore.open(js, settings.outbound_max_lifetime)
    blobs = BlobCache()
    workers = [OutboundWorker(settings, js, metadata, state, f"outbound-{i}", blobs)
               for i in range(settings.outbound_workers)]
    for worker in workers:
        await worker.subscribe()
    return [asyncio.create_task(w.run(stop), name=w.name) for w in workers]
