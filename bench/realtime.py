"""Live events: latency from the SMTP 250 to the WebSocket event (p50/p99) at 1, 50 and
200 msgs/s with 1,000 idle sessions connected, and the memory an idle session costs.

The idle sessions belong to 1,000 distinct users (the costly case for realtime_svc: one
feed each); their tokens are signed with the suite's secret, so no user rows are needed.
The measured session is a real user's; messages are sent open-loop (at fixed times,
whatever the replies) over a pool of SMTP connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage

import aiosmtplib
import httpx
import jwt
from websockets.asyncio.client import ClientConnection, connect

from bench.realtime_fanout import measure, row
from bench.stats import percentile, rss_bytes_of_tree
from bench.suite import Suite
from gateway.auth import TokenSigner
from mailgrid import bus
from mailgrid.v1 import common_pb2, events_pb2

ADDRESS = "live@example.test"
PASSWORD = "bench-password-1"
MiB = 1024 * 1024


@dataclass
class Run:
    rate: int
    count: int
    sent: dict[int, float] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)
    send_seconds: float = 0.0
    all_seen: asyncio.Event = field(default_factory=asyncio.Event)

    def row(self) -> str:
        lat = [self.seen[n] - self.sent[n] for n in self.sent if n in self.seen]
        return (f"{self.rate:>4} msgs/s (sent at {self.count / self.send_seconds:6.1f}/s, "
                f"n={self.count:<5}) 250→event p50 {percentile(lat, 50) * 1000:7.1f} ms"
                f"   p99 {percentile(lat, 99) * 1000:7.1f} ms   missing {self.count - len(lat)}")


def _message(n: int, rate: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "peer@bench.test", ADDRESS, f"rt {rate} {n}"
    msg.set_content("a live event benchmark message\n")
    return msg.as_bytes(policy=policy.SMTP)


async def _receive(ws: ClientConnection, runs: dict[int, Run]) -> None:
    async for raw in ws:
        event = json.loads(raw)
        if event["type"] != "message_added":
            continue
        _, rate, n = event["message"]["subject"].split()
        run = runs[int(rate)]
        run.seen[int(n)] = time.perf_counter()
        if len(run.seen) == run.count:
            run.all_seen.set()


async def _send_at_rate(smtp_addr: str, run: Run) -> None:
    host, port = smtp_addr.rsplit(":", 1)
    pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
    clients = [aiosmtplib.SMTP(hostname=host, port=int(port), timeout=60)
               for _ in range(max(2, run.rate // 5))]
    for client in clients:
        await client.connect()
        pool.put_nowait(client)

    async def one(n: int) -> None:
        client = await pool.get()
        try:
            await client.sendmail("peer@bench.test", [ADDRESS], _message(n, run.rate))
            run.sent[n] = time.perf_counter()
        finally:
            pool.put_nowait(client)

    started = time.perf_counter()
    tasks = []
    for n in range(run.count):
        delay = started + n / run.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    run.send_seconds = time.perf_counter() - started
    for client in clients:
        await client.quit()


async def _publish_at_rate(nats_url: str, user_id: str, run: Run) -> None:
    """MailEvents straight onto the bus: the realtime path alone (no SMTP, no delivery)."""
    nc = await bus.connect(nats_url, "bench-realtime")
    js = nc.jetstream()
    started = time.perf_counter()
    try:
        for n in range(run.count):
            delay = started + n / run.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            event = events_pb2.MailEvent(user_id=user_id, message_added=events_pb2.MessageAdded(
                message=common_pb2.MessageSummary(email_id=str(uuid.uuid1()),
                                                  subject=f"rt {run.rate} {n}")))
            await bus.publish(js, bus.events_subject(user_id), event.SerializeToString(),
                              msg_id=str(uuid.uuid4()))
            run.sent[n] = time.perf_counter()
        run.send_seconds = time.perf_counter() - started
    finally:
        await nc.close()


async def _open_idle(url: str, tokens: list[str], concurrency: int = 50
                     ) -> list[ClientConnection]:
    sockets: list[ClientConnection] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(token: str) -> None:
        async with gate:
            ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                               open_timeout=60, compression=None)
            while json.loads(await ws.recv())["type"] != "ready":
                pass
            sockets.append(ws)

    await asyncio.gather(*(one(t) for t in tokens))
    return sockets


def _rss(suite: Suite) -> dict[str, int]:
    services = suite.endpoints()["services"]
    return {name: rss_bytes_of_tree(services[name]["pid"]) for name in ("gateway", "realtime")}


async def run_realtime(suite: Suite, idle: int, plan: list[tuple[int, int]],
                       bus_plan: list[tuple[int, int]]) -> None:
    secret = (suite.data_dir / "secrets" / "token_secret").read_text().strip()
    signer = TokenSigner(secret=secret, ttl=24 * 3600)
    url = f"ws://{suite.http_addr}/v1/events"
    await asyncio.sleep(2.0)
    before = _rss(suite)
    started = time.perf_counter()
    idle_sockets = await _open_idle(url, [signer.issue(str(uuid.uuid4())) for _ in range(idle)])
    opened = time.perf_counter() - started
    await asyncio.sleep(3.0)
    after = _rss(suite)
    print(f"{idle} idle sessions (distinct users) opened in {opened:.1f} s; RSS growth per "
          "session: " + ", ".join(
              f"{name} {(after[name] - before[name]) / idle / 1024:.1f} KiB "
              f"({before[name] / MiB:.0f}→{after[name] / MiB:.0f} MiB)" for name in before),
          flush=True)

    async with httpx.AsyncClient(base_url=f"http://{suite.http_addr}", timeout=30) as http:
        reply = await http.post("/v1/auth/token", json={"address": ADDRESS, "password": PASSWORD})
        reply.raise_for_status()
        token = reply.json()["access_token"]
    runs = {rate: Run(rate, count) for rate, count in plan}
    ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                       compression=None)
    while json.loads(await ws.recv())["type"] != "ready":
        pass
    receiver = asyncio.create_task(_receive(ws, runs))
    for run in runs.values():
        await _send_at_rate(suite.smtp_addr, run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.all_seen.wait(), 60)
        print("  " + run.row(), flush=True)
    print("Live events from the bus (EVENTS publish ack → WebSocket event; no SMTP):")
    user_id = jwt.decode(token, options={"verify_signature": False})["sub"]
    nats_url = suite.endpoints()["nats_url"]
    for rate, count in bus_plan:
        run = runs[rate] = Run(rate, count)
        await _publish_at_rate(nats_url, user_id, run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.all_seen.wait(), 60)
        print("  " + run.row().replace("250→event", "ack→event"), flush=True)
    receiver.cancel()
    await ws.close()
    for sock in idle_sockets:
        await sock.close()


def realtime(quick: bool) -> None:
    import tempfile
    from pathlib import Path

    print("Idle session cost on the bus (1,000 sessions, 10 s idle; design choice):")
    for kind in ("core", "ordered"):
        print("  " + row(measure(kind, 1000, 3.0 if quick else 10.0)), flush=True)
    plan = [(1, 5), (50, 100), (200, 200)] if quick else [(1, 30), (50, 500), (200, 1000)]
    # Other rates than the SMTP plan's: runs are keyed by rate.
    bus_plan = [(201, 200), (1000, 1000)] if quick else [(201, 2000), (1000, 5000)]
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-") as tmp, \
            Suite(Path(tmp) / "data") as suite:
        suite.mailgrid("user", "add", ADDRESS, "--password", PASSWORD)
        print("Live events through the suite (SMTP 250 → WebSocket event):")
        asyncio.run(run_realtime(suite, 1000, plan, bus_plan))
