"""API send to local recipients: sends/s and the latency from POST /v1/messages until
the message is visible in the recipient's inbox over the HTTP API.

Closed loop: each of ``concurrency`` clients sends as its own user to its own
recipient, waits until the message tops that recipient's inbox listing, then sends
the next. Each client polls every ``poll_interval(concurrency)`` seconds (5 ms alone, up
to 50 ms with many clients, so that polling does not become the load measured): that
bounds the resolution of the "visible" latency. The 202 latency (accepted: in Sent and
queued for every recipient) is reported too.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.stats import percentile
from bench.suite import Suite
from mailgrid.clients import MetadataClient

PASSWORD = "bench-password-1"


def poll_interval(concurrency: int) -> float:
    return min(0.05, 0.005 * concurrency)

TEXT = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\n" * 50


@dataclass
class SendResult:
    concurrency: int
    messages: int
    seconds: float
    accepted: list[float]
    visible: list[float]

    def row(self) -> str:
        ms = 1000.0
        return (f"c={self.concurrency:<3} n={self.messages:<5} "
                f"{self.messages / self.seconds:7.1f} sends/s   "
                f"202 p50 {percentile(self.accepted, 50) * ms:6.1f} ms "
                f"p99 {percentile(self.accepted, 99) * ms:6.1f} ms   "
                f"visible p50 {percentile(self.visible, 50) * ms:6.1f} ms "
                f"p99 {percentile(self.visible, 99) * ms:6.1f} ms")


async def _token(http: httpx.AsyncClient, address: str) -> dict[str, str]:
    reply = await http.post("/v1/auth/token", json={"address": address, "password": PASSWORD})
    reply.raise_for_status()
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


async def _client(http: httpx.AsyncClient, sender: dict[str, str], rcpt: str,
                  reader: dict[str, str], tag: str, count: int, result: SendResult) -> None:
    poll = poll_interval(result.concurrency)
    for n in range(count):
        subject = f"bench {tag} {n}"
        started = time.perf_counter()
        reply = await http.post("/v1/messages", headers=sender, json={
            "to": [rcpt], "subject": subject, "text": TEXT})
        reply.raise_for_status()
        result.accepted.append(time.perf_counter() - started)
        while True:
            page = await http.get("/v1/folders/inbox/messages?limit=1", headers=reader)
            page.raise_for_status()
            top = page.json()["messages"]
            if top and top[0]["subject"] == subject:
                break
            await asyncio.sleep(poll)
        result.visible.append(time.perf_counter() - started)


async def run_send(http_base: str, metadata_addr: str, concurrency: int, count: int,
                   round_no: int) -> SendResult:
    """``count`` sends spread over ``concurrency`` clients (users made for this round)."""
    pairs = [(f"s{round_no}-{i}@example.test", f"r{round_no}-{i}@example.test")
             for i in range(concurrency)]
    async with MetadataClient(metadata_addr, timeout=120) as md:
        for pair in pairs:  # argon2 hashes: a few at a time
            await asyncio.gather(*(md.create_user(a, PASSWORD) for a in pair))
    limits = httpx.Limits(max_connections=2 * concurrency + 4)
    async with httpx.AsyncClient(base_url=http_base, timeout=60, limits=limits) as http:
        tokens = [(await _token(http, s), await _token(http, r)) for s, r in pairs]
        result = SendResult(concurrency, count, 0.0, [], [])
        per_client = [count // concurrency + (i < count % concurrency)
                      for i in range(concurrency)]
        started = time.perf_counter()
        await asyncio.gather(*(
            _client(http, sender, rcpt, reader, f"{round_no}.{i}", n, result)
            for i, ((sender, reader), (_, rcpt), n) in enumerate(
                zip(tokens, pairs, per_client, strict=True))))
        result.seconds = time.perf_counter() - started
    return result


def send(quick: bool) -> None:
    plan = [(1, 30 if quick else 300), (10, 100 if quick else 1000),
            (50, 200 if quick else 2000)]
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-") as tmp, \
            Suite(Path(tmp) / "data") as suite:
        metadata_addr = suite.endpoints()["services"]["metadata"]["grpc_addr"]
        print("API send to local recipients (new suite; ~4 KB text; visible = "
              "in the recipient's inbox listing over HTTP)")
        for round_no, (concurrency, count) in enumerate(plan):
            result = asyncio.run(run_send(f"http://{suite.http_addr}", metadata_addr,
                                          concurrency, count, round_no))
            print("  " + result.row(), flush=True)
