"""Folder listing: first page and a deep page (page 100) of a 100,000-message inbox,
HTTP p50/p99 through the gateway (cursor pagination, newest first)."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.stats import percentile
from bench.suite import Suite
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, metadata_pb2
from metadata_svc.app import open_store
from metadata_svc.blobs_fs import FileBlobStore

ADDRESS = "listing@example.test"
PASSWORD = "bench-password-1"
PAGE_SIZE = 50


async def fill(settings: Settings, count: int) -> None:
    """Files ``count`` messages straight into the store (the suite is down)."""
    store = await open_store(settings)
    try:
        user = await store.create_user(ADDRESS, PASSWORD)
        raw = b"From: a@example.org\r\nSubject: listing\r\n\r\nbody\r\n"
        blob = await FileBlobStore(settings.blob_dir).put_bytes(raw)
        sender = common_pb2.EmailAddress(name="A", email="a@example.org")
        started = time.perf_counter()
        for n in range(count):
            parsed = metadata_pb2.ParsedMessage(
                subject=f"message {n}", preview="listing benchmark",
                message_id=f"{n}@bench.test")
            getattr(parsed, "from").CopyFrom(sender)  # "from" is a Python keyword
            await store.store_delivery(metadata_pb2.StoreDeliveryRequest(
                user_id=user.user_id, delivery_key=f"bench:{n}", blob_key=blob.key,
                size=len(raw), parsed=parsed, is_read=n % 3 == 0))
            if n and n % 10_000 == 0:
                rate = n / (time.perf_counter() - started)
                print(f"    filled {n} ({rate:.0f}/s)", file=sys.stderr, flush=True)
    finally:
        await store.close()


async def measure(base: str, rounds: int) -> dict[str, list[float]]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        token = (await http.post("/v1/auth/token", json={"address": ADDRESS,
                                                          "password": PASSWORD})).json()
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        url = f"/v1/folders/inbox/messages?limit={PAGE_SIZE}"
        cursor = ""
        for _ in range(99):  # walk to the cursor of page 100
            page = (await http.get(url + (f"&cursor={cursor}" if cursor else ""),
                                   headers=auth)).json()
            cursor = page["next_cursor"]
        timings: dict[str, list[float]] = {"first page": [], "page 100": [],
                                           "unread first page": []}
        targets = {"first page": url, "page 100": f"{url}&cursor={cursor}",
                   "unread first page": f"{url}&unread=true"}
        for _ in range(rounds):
            for name, target in targets.items():
                started = time.perf_counter()
                reply = await http.get(target, headers=auth)
                timings[name].append(time.perf_counter() - started)
                assert reply.status_code == 200 and len(reply.json()["messages"]) == PAGE_SIZE
    return timings


def listing(quick: bool) -> None:
    count = 10_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-") as tmp:
        suite = Suite(Path(tmp) / "data")
        settings = Settings(data_dir=suite.data_dir)
        print(f"Folder listing ({count} messages in the inbox, {PAGE_SIZE} per page)")
        started = time.perf_counter()
        asyncio.run(fill(settings, count))
        print(f"  filled in {time.perf_counter() - started:.0f} s", flush=True)
        with suite:
            timings = asyncio.run(measure(f"http://{suite.http_addr}", 50 if quick else 300))
        for name, values in timings.items():
            print(f"  {name:<18} p50 {percentile(values, 50)*1000:6.1f} ms   "
                  f"p99 {percentile(values, 99)*1000:6.1f} ms")
