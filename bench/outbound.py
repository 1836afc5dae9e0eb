"""Outbound delivery rate: OutboundJobs through `mailgrid up` to a loopback SMTP sink.

For each worker count (= concurrent SMTP connections) a fresh suite is started with
every domain routed to one sink (tests/peers/smtp_peer.py --discard, an aiosmtpd
process), one 4 KiB message is put in the blob store, and COUNT jobs of one recipient
each are published; the rate is COUNT over the time from the first publish until the
OUTBOUND work queue is empty (every job acked after the sink's 250).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.suite import Suite
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.v1 import delivery_pb2
from tests.peers.procs import SmtpPeer

SIZE = 4 * 1024
# Publishes in flight at once, so publishing outpaces delivery and is not what is timed.
PUBLISH_WINDOW = 200


@dataclass
class OutboundSuite(Suite):
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(self.extra)
        return env


def message(size: int) -> bytes:
    head = (b"From: bench@example.test\r\nTo: sink@bench.example\r\n"
            b"Subject: outbound bench\r\nMessage-ID: <bench@example.test>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def run(suite: Suite, count: int) -> float:
    """Publishes ``count`` jobs and returns deliveries per second."""
    endpoints = suite.endpoints()
    metadata_addr = endpoints["services"]["metadata"]["grpc_addr"]
    async with MetadataClient(metadata_addr) as client:
        user = await client.create_user("bench@example.test", "bench-password-1")
        raw = message(SIZE)
        stored = await client.put_blob(raw)
    nc = await bus.connect(endpoints["nats_url"], "bench-outbound")
    js = nc.jetstream()
    window = asyncio.Semaphore(PUBLISH_WINDOW)

    async def publish(n: int) -> None:
        job = delivery_pb2.OutboundJob(
            job_id=f"bench-{n}", blob_key=stored.blob_key, size=len(raw),
            mail_from="bench@example.test", sender_user_id=user.user_id,
            domain="bench.example", rcpt_to=[f"sink{n}@bench.example"])
        job.queued_at.GetCurrentTime()
        async with window:
            await bus.publish(js, "mail.outbound.bench.example", job.SerializeToString(),
                              job.job_id)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(publish(n) for n in range(count)))
        while True:  # a work queue is empty once every job is acked
            if not (await js.stream_info("OUTBOUND")).state.messages:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
    finally:
        await nc.close()
    return count / elapsed


def outbound(quick: bool) -> None:
    count = 200 if quick else 3000
    print(f"Outbound to a loopback SMTP sink ({count} jobs of {SIZE // 1024} KiB, "
          "one recipient each; rate = until every job is acked)")
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-") as tmp:
        sink = SmtpPeer.start(Path(tmp) / "sink", discard=True)
        try:
            for workers in (10, 50):
                extra = {"MAILGRID_OUTBOUND_WORKERS": str(workers),
                         "MAILGRID_OUTBOUND_ROUTES": f"*={sink.addr}"}
                with OutboundSuite(Path(tmp) / f"data-{workers}", extra=extra) as suite:
                    rate = asyncio.run(run(suite, count))
                print(f"  {workers:3d} connections: {rate:8.1f} msgs/s", flush=True)
        finally:
            sink.stop()
