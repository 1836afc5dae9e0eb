"""Operating the outbound queue: list its jobs, retry one now, drop one.

Jobs are read where they are kept, without consuming them: OUTBOUND (a work queue) and
DEAD are read message by message with JetStream's get-next-by-subject, the consumer's
delivered sequence tells queued jobs from those a worker has had, and the state bucket
(delivery_svc.outbound_state) tells deferred jobs apart with their attempts and last
error. Retrying re-publishes the job under a derived id and deletes the old message, so a
job is never in the queue twice.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from delivery_svc.outbound import (
    DEAD_SUBJECT,
    DURABLE,
    STREAM,
    SUBJECTS,
    derived_job_id,
    outbound_subject,
)
from delivery_svc.outbound_state import StateStore
from mailgrid import bus
from mailgrid.errors import InvalidArgument, NotFound, Unavailable
from mailgrid.grpcutil import rpc
from mailgrid.v1 import delivery_pb2

Context = grpc.aio.ServicerContext[Any, Any]
JobState = delivery_pb2.JobState
DEAD_STREAM = "DEAD"
DEFAULT_LIMIT = 1000
# Used only if the state bucket does not exist yet (no worker ever ran).
DEFAULT_LIFETIME = 5 * 24 * 3600.0


class OutboundQueue:
    def __init__(self, js: JetStreamContext, state: StateStore) -> None:
        self.js = js
        self.state = state

    async def jobs(self, states: Iterable[int] = (), limit: int = 0
                   ) -> tuple[list[delivery_pb2.QueuedJob], bool]:
        """Jobs in queue order, then dead ones; and whether more than ``limit`` matched."""
        wanted = set(states)
        limit = limit or DEFAULT_LIMIT
        found: list[delivery_pb2.QueuedJob] = []
        async for job in self._all():
            if wanted and job.state not in wanted:
                continue
            if len(found) == limit:
                return found, True
            found.append(job)
        return found, False

    async def find(self, job_id: str) -> delivery_pb2.QueuedJob:
        if not job_id:
            raise InvalidArgument("a job id is required")
        async for job in self._all():
            if job.job.job_id == job_id:
                return job
        raise NotFound(f"no job {job_id} in the outbound queue or among dead jobs")

    async def retry(self, job_id: str) -> delivery_pb2.QueuedJob:
        """A deferred job is queued to go now, a dead one queued again; others as they are."""
        found = await self.find(job_id)
        if found.state not in (JobState.JOB_STATE_DEFERRED, JobState.JOB_STATE_DEAD):
            return found
        job = delivery_pb2.OutboundJob()
        job.CopyFrom(found.job)
        job.job_id = derived_job_id(job.job_id, f"r{time.time_ns():x}")
        job.ClearField("not_before")
        job.previous_attempts = found.attempts
        job.last_error = found.last_error
        if found.state == JobState.JOB_STATE_DEAD:
            job.queued_at.GetCurrentTime()  # a new lifetime, as after `postsuper -r`
        seq = await bus.publish(self.js, outbound_subject(job.domain), job.SerializeToString(),
                                job.job_id)
        await self._delete(found)
        return delivery_pb2.QueuedJob(job=job, state=JobState.JOB_STATE_QUEUED,
                                      attempts=job.previous_attempts,
                                      last_error=job.last_error, stream=STREAM,
                                      stream_sequence=seq)

    async def drop(self, job_id: str) -> delivery_pb2.QueuedJob:
        """Removes the job; nobody is notified (an operator's decision)."""
        found = await self.find(job_id)
        await self._delete(found)
        return found

    async def _delete(self, found: delivery_pb2.QueuedJob) -> None:
        try:
            await self.js.delete_msg(found.stream, found.stream_sequence)
        except NotFoundError:
            pass  # settled meanwhile
        except Exception as err:
            raise Unavailable(f"cannot delete job {found.job.job_id}: {err}") from err
        if found.stream == STREAM:
            await self.state.delete(found.stream_sequence)

    # reading

    async def _all(self) -> AsyncIterator[delivery_pb2.QueuedJob]:
        delivered = await self._delivered_seq()
        now = time.time()
        async for seq, data in self._messages(STREAM, SUBJECTS):
            yield await self._queued(seq, data, delivered, now)
        async for seq, data in self._messages(DEAD_STREAM, DEAD_SUBJECT):
            dead = _dead(seq, data)
            if dead is not None:
                yield dead

    async def _queued(self, seq: int, data: bytes, delivered: int, now: float
                      ) -> delivery_pb2.QueuedJob:
        try:
            job = delivery_pb2.OutboundJob.FromString(data)
        except DecodeError:
            job = delivery_pb2.OutboundJob(job_id=f"unreadable-{seq}")
        item = delivery_pb2.QueuedJob(job=job, stream=STREAM, stream_sequence=seq,
                                      attempts=job.previous_attempts,
                                      last_error=job.last_error)
        not_before = job.not_before.seconds if job.HasField("not_before") else 0
        state = await self.state.get(seq) if seq <= delivered else None
        if state is not None:
            item.attempts, item.last_error = state.attempts, state.last_error
        next_attempt = max(not_before, int(state.next_attempt) if state else 0)
        if next_attempt > now:
            item.state = JobState.JOB_STATE_DEFERRED
            item.next_attempt.FromSeconds(next_attempt)
        elif seq <= delivered:
            item.state = JobState.JOB_STATE_ACTIVE
        else:
            item.state = JobState.JOB_STATE_QUEUED
        return item

    async def _delivered_seq(self) -> int:
        try:
            info = await self.js.consumer_info(STREAM, DURABLE)
        except NotFoundError:
            return 0
        except Exception as err:
            raise Unavailable(f"cannot read consumer {DURABLE}: {err}") from err
        return int(info.delivered.stream_seq or 0) if info.delivered else 0

    async def _messages(self, stream: str, subject: str) -> AsyncIterator[tuple[int, bytes]]:
        """Every message of ``stream`` on ``subject``, oldest first, none consumed."""
        try:
            info = await self.js.stream_info(stream)
        except NotFoundError:
            return
        except Exception as err:
            raise Unavailable(f"cannot read stream {stream}: {err}") from err
        seq = max(int(info.state.first_seq or 1), 1)
        while info.state.messages:
            try:
                raw = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return
            except Exception as err:
                raise Unavailable(f"cannot read stream {stream}: {err}") from err
            if raw.seq is None:
                return
            yield int(raw.seq), raw.data or b""
            seq = int(raw.seq) + 1


def _dead(seq: int, data: bytes) -> delivery_pb2.QueuedJob | None:
    try:
        letter = delivery_pb2.DeadLetter.FromString(data)
        job = delivery_pb2.OutboundJob.FromString(letter.payload)
    except DecodeError:
        return None
    if not job.job_id:
        return None
    return delivery_pb2.QueuedJob(job=job, state=JobState.JOB_STATE_DEAD,
                                  attempts=letter.attempts, last_error=letter.reason,
                                  stream=DEAD_STREAM, stream_sequence=seq)


class QueueOpsServicer:
    """ListQueue, RetryJob and DropJob of DeliveryService, mixed into its servicer."""

    js: JetStreamContext
    _outbound_queue: OutboundQueue | None = None

    async def _queue(self) -> OutboundQueue:
        if self._outbound_queue is None:
            state = await StateStore.open(self.js, DEFAULT_LIFETIME)
            self._outbound_queue = OutboundQueue(self.js, state)
        return self._outbound_queue

    @rpc
    async def ListQueue(self, request: delivery_pb2.ListQueueRequest,
                        context: Context) -> delivery_pb2.ListQueueResponse:
        queue = await self._queue()
        jobs, truncated = await queue.jobs(request.states, request.limit)
        return delivery_pb2.ListQueueResponse(jobs=jobs, truncated=truncated)

    @rpc
    async def RetryJob(self, request: delivery_pb2.RetryJobRequest,
                       context: Context) -> delivery_pb2.RetryJobResponse:
        queue = await self._queue()
        return delivery_pb2.RetryJobResponse(job=await queue.retry(request.job_id))

    @rpc
    async def DropJob(self, request: delivery_pb2.DropJobRequest,
                      context: Context) -> delivery_pb2.DropJobResponse:
        queue = await self._queue()
        return delivery_pb2.DropJobResponse(job=await queue.drop(request.job_id))
