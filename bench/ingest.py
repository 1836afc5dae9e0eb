"""SMTP ingest: messages/s until every message is visible through the HTTP API,
and the latency of the 250 reply, at several sizes and concurrencies."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import httpx

from bench.stats import percentile


@dataclass
class IngestResult:
    size: int
    concurrency: int
    messages: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def row(self) -> str:
        return (f"{self.size // 1024:>5} KB  c={self.concurrency:<3} n={self.messages:<5} "
                f"{self.rate:8.1f} msgs/s   250 p50 {percentile(self.latencies, 50)*1000:7.1f} ms"
                f"   p99 {percentile(self.latencies, 99)*1000:7.1f} ms")


def make_message(size: int, sender: str, rcpt: str, n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Subject"] = f"bench message {n}"
    msg["Message-ID"] = make_msgid(domain="bench.test")
    line = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\n"
    body = (line * (size // len(line) + 1))[: max(0, size - 300)]
    msg.set_content(body)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def _sender(host: str, port: int, queue: asyncio.Queue[bytes], rcpt: str,
                  latencies: list[float]) -> None:
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=60)
    await client.connect()
    try:
        while True:
            try:
                raw = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            await client.sendmail("sender@bench.test", [rcpt], raw)
            latencies.append(time.perf_counter() - started)
    finally:
        await client.quit()


async def inbox_total(http: httpx.AsyncClient, token: str) -> int:
    reply = await http.get("/v1/folders", headers={"Authorization": f"Bearer {token}"})
    reply.raise_for_status()
    return int(next(f["total"] for f in reply.json()["folders"] if f["role"] == "inbox"))


async def run_ingest(smtp_addr: str, http_base: str, rcpt: str, password: str,
                     size: int, concurrency: int, count: int) -> IngestResult:
    host, port = smtp_addr.rsplit(":", 1)
    async with httpx.AsyncClient(base_url=http_base, timeout=30) as http:
        token_reply = await http.post("/v1/auth/token",
                                      json={"address": rcpt, "password": password})
        token_reply.raise_for_status()
        token = token_reply.json()["access_token"]
        before = await inbox_total(http, token)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(make_message(size, "sender@bench.test", rcpt, n))
        latencies: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(_sender(host, int(port), queue, rcpt, latencies)
                               for _ in range(concurrency)))
        # Polling the API is the measurement: "visible to the user" is the end point.
        while await inbox_total(http, token) < before + count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    return IngestResult(size, concurrency, count, elapsed, latencies)
