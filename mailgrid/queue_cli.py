"""`mailgrid queue` job commands: list outbound jobs, retry one, drop one (over gRPC to the
running suite's delivery_svc; see delivery_svc.queue_ops)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from mailgrid.grpcutil import call, channel
from mailgrid.v1 import delivery_pb2, delivery_pb2_grpc

JOB_HEADER = ["JOB", "STATE", "RECIPIENTS", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR"]
STATE_NAMES = {
    delivery_pb2.JOB_STATE_QUEUED: "queued",
    delivery_pb2.JOB_STATE_ACTIVE: "active",
    delivery_pb2.JOB_STATE_DEFERRED: "deferred",
    delivery_pb2.JOB_STATE_DEAD: "dead",
}
ERROR_WIDTH = 60


def add_arguments(queue: argparse.ArgumentParser) -> None:
    """`queue` alone shows the streams and the jobs; `queue retry ID`, `queue drop ID`."""
    actions = queue.add_subparsers(dest="queue_command", required=False, metavar="ACTION")
    retry = actions.add_parser("retry", help="try a deferred job now; queue a dead one again")
    retry.add_argument("job_id", metavar="ID")
    drop = actions.add_parser("drop", help="remove a job (queued, deferred or dead) unsent")
    drop.add_argument("job_id", metavar="ID")


async def list_jobs(addr: str, limit: int = 1000) -> tuple[list[list[str]], bool]:
    """Rows for the jobs table, and whether more jobs exist than were listed."""
    async with channel(addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        reply = await call(stub.ListQueue(delivery_pb2.ListQueueRequest(limit=limit),
                                          timeout=30.0))
    return [job_row(job) for job in reply.jobs], reply.truncated


def job_row(job: delivery_pb2.QueuedJob) -> list[str]:
    next_attempt = ""
    if job.HasField("next_attempt") and job.next_attempt.seconds:
        when = datetime.fromtimestamp(job.next_attempt.seconds, UTC)
        next_attempt = when.strftime("%Y-%m-%d %H:%M:%SZ")
    error = " ".join(job.last_error.split())
    if len(error) > ERROR_WIDTH:
        error = error[:ERROR_WIDTH - 3] + "..."
    return [job.job.job_id, STATE_NAMES.get(job.state, "?"), ",".join(job.job.rcpt_to),
            str(job.attempts), next_attempt or "-", error or "-"]


async def job_action(addr: str, action: str, job_id: str) -> str:
    """Retries or drops ``job_id``; returns the line to print."""
    async with channel(addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        if action == "retry":
            reply = await call(stub.RetryJob(delivery_pb2.RetryJobRequest(job_id=job_id),
                                             timeout=30.0))
            job = reply.job
            if job.job.job_id == job_id:
                return f"{job_id} is {STATE_NAMES.get(job.state, '?')}: nothing to retry"
            return f"{job_id} queued again as {job.job.job_id}"
        dropped = await call(stub.DropJob(delivery_pb2.DropJobRequest(job_id=job_id),
                                          timeout=30.0))
        return (f"dropped {job_id} ({STATE_NAMES.get(dropped.job.state, '?')}, "
                f"{len(dropped.job.job.rcpt_to)} recipient(s))")
