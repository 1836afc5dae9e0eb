"""Outbound delivery in the whole suite (`mailgrid up`) to an SMTP peer process: kill -9
of delivery_svc in the middle of a DATA loses nothing and duplicates at most the message
in flight; `mailgrid queue` lists, retries and drops jobs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.natsd import free_port
from mailgrid.v1 import delivery_pb2
from tests.e2e.conftest import LaunchSuite, Suite, process_gone
from tests.peers.procs import SmtpPeer, StartSmtpPeer, smtp_peers

__all__ = ["smtp_peers"]  # fixture

pytestmark = pytest.mark.e2e

TOTAL = 12
SENDER = "sender@example.test"
SLOW = "slow@example.net"


def suite_with_peer(launch_suite: LaunchSuite, peer: SmtpPeer) -> Suite:
    return launch_suite(env={
        "MAILGRID_OUTBOUND_ROUTES": f"example.net={peer.addr},"
                                    f"nowhere.example=127.0.0.1:{free_port()}",
        # One worker: one message in flight, so at most one can be duplicated.
        "MAILGRID_OUTBOUND_WORKERS": "1",
        "MAILGRID_OUTBOUND_ACK_WAIT": "2",
        "MAILGRID_OUTBOUND_RETRY_DELAY": "60",
        "MAILGRID_OUTBOUND_RETRY_MAX_DELAY": "60",
    })


async def publish_jobs(suite: Suite, jobs: list[tuple[str, str]]) -> None:
    """Queues (job id, recipient) pairs as SubmitMessage would, one message each."""
    endpoints = suite.endpoints()
    async with MetadataClient(endpoints.services["metadata"].grpc_addr) as client:
        user = await client.create_user(SENDER, "a password")
        nc = await bus.connect(endpoints.nats_url, "e2e-test")
        try:
            js = nc.jetstream()
            for job_id, rcpt in jobs:
                raw = (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {job_id}\r\n"
                       f"Message-ID: <{job_id}@example.test>\r\n\r\nHello {rcpt}.\r\n").encode()
                stored = await client.put_blob(raw)
                domain = rcpt.rpartition("@")[2]
                job = delivery_pb2.OutboundJob(
                    job_id=job_id, blob_key=stored.blob_key, size=len(raw),
                    mail_from=SENDER, sender_user_id=user.user_id, domain=domain,
                    rcpt_to=[rcpt])
                job.queued_at.GetCurrentTime()
                await bus.publish(js, f"{bus.OUTBOUND_PREFIX}.{domain}",
                                  job.SerializeToString(), job_id)
        finally:
            await nc.close()


def delivered(peer: SmtpPeer) -> Counter[str]:
    return Counter(rcpt for message in peer.messages() for rcpt in message.rcpt_tos)


def test_kill_9_mid_data_loses_nothing_and_duplicates_at_most_one(
        launch_suite: LaunchSuite, smtp_peers: StartSmtpPeer, tmp_path: Path) -> None:
    # The first message to SLOW is saved by the peer, which then waits before its 250:
    # the kill lands while the worker waits for the reply to DATA.
    peer = smtp_peers(behaviour={SLOW: ["slow:20", "accept"]})
    suite = suite_with_peer(launch_suite, peer)
    rcpts = [SLOW] + [f"user{n}@example.net" for n in range(TOTAL - 1)]
    asyncio.run(publish_jobs(suite, [(f"crash-{n}", rcpt) for n, rcpt in enumerate(rcpts)]))
    suite.wait_until(lambda: delivered(peer)[SLOW] == 1, "the slow DATA to reach the peer")
    pid = suite.service_pid("delivery")
    os.kill(pid, signal.SIGKILL)
    suite.wait_until(lambda: process_gone(pid), "delivery_svc to die")
    suite.wait_until(lambda: set(delivered(peer)) == set(rcpts), "every job delivered",
                     timeout=120)
    time.sleep(1.0)  # a late duplicate would show now
    counts = delivered(peer)
    assert all(counts[rcpt] == 1 for rcpt in rcpts[1:]), counts
    assert counts[SLOW] in (1, 2), counts  # the one in flight may come twice
    assert suite.service_pid("delivery") != pid


def test_queue_command_lists_retries_and_drops_jobs(
        launch_suite: LaunchSuite, smtp_peers: StartSmtpPeer) -> None:
    peer = smtp_peers()
    suite = suite_with_peer(launch_suite, peer)
    asyncio.run(publish_jobs(suite, [("stuck-1", "bob@nowhere.example")]))

    def listed() -> list[str]:
        shown = suite.cli("queue")
        assert shown.returncode == 0, shown.stderr
        return [line for line in shown.stdout.splitlines() if line.startswith("stuck-1")]

    suite.wait_until(lambda: any(" deferred " in row for row in listed()),
                     "the job listed as deferred")
    [row] = listed()
    assert "bob@nowhere.example" in row and "cannot connect" in row
    retried = suite.cli("queue", "retry", "stuck-1")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith("stuck-1 queued again as stuck-1+r")
    new_id = retried.stdout.split()[-1]
    missing = suite.cli("queue", "retry", "stuck-1")
    assert missing.returncode == 1
    assert "no job stuck-1" in missing.stderr
    suite.wait_until(lambda: any(line.startswith(new_id) and " deferred " in line
                                 for line in suite.cli("queue").stdout.splitlines()),
                     "the retried job deferred again")
    dropped = suite.cli("queue", "drop", new_id)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.startswith(f"dropped {new_id} (deferred, 1 recipient(s))")
    assert "no outbound jobs" in suite.cli("queue").stdout
