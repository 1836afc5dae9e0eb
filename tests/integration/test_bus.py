"""The bus against a real nats-server: atomic batches (JetStream, every write synced) and
the server's own limits."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import psutil
import pytest
from nats.aio.client import Client as NATS

from mailgrid import bus
from mailgrid.natsd import NatsServer


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def stored(nc: NATS, stream: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message of ``stream``: subject, payload and headers, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        found.append((msg.subject, msg.data, dict(msg.headers or {})))
    return found


async def test_a_batch_is_stored_whole_in_order_under_one_batch_id(nc: NATS) -> None:
    messages = [(bus.events_subject("u1"), b"one", "e1"),
                (bus.events_subject("u2"), b"two", "e2"),
                (bus.events_subject("u1"), b"three", "e3")]
    last = await bus.publish_atomic(nc, messages)
    found = await stored(nc, "EVENTS")
    assert last == 3
    assert [(subject, data) for subject, data, _ in found] == [m[:2] for m in messages]
    assert [headers["Nats-Msg-Id"] for _, _, headers in found] == ["e1", "e2", "e3"]
    assert len({headers[bus.BATCH_ID] for _, _, headers in found}) == 1


async def test_a_batch_with_an_id_stored_before_is_refused_whole(nc: NATS) -> None:
    """As after a commit whose ack was lost: nothing of the retry is stored, and the
    error says why, so the caller can fall back to publishing one by one."""
    await bus.publish_atomic(nc, [(bus.events_subject("u1"), b"one", "e1"),
                                  (bus.events_subject("u1"), b"two", "e2")])
    with pytest.raises(bus.BatchRejected) as refused:
        await bus.publish_atomic(nc, [(bus.events_subject("u1"), b"two", "e2"),
                                      (bus.events_subject("u1"), b"new", "e3")])
    assert refused.value.code == bus.BATCH_DUPLICATE
    assert [data for _, data, _ in await stored(nc, "EVENTS")] == [b"one", b"two"]


async def test_only_events_takes_atomic_batches(nc: NATS) -> None:
    js = nc.jetstream()
    assert await bus.accepts_atomic(js, "EVENTS")
    assert not await bus.accepts_atomic(js, "INBOUND")


async def test_nats_server_runs_under_the_memory_limit_it_is_given(tmp_path: Path) -> None:
    limited = NatsServer(store_dir=tmp_path / "limited", memory_limit=64 * 1024 * 1024)
    unlimited = NatsServer(store_dir=tmp_path / "unlimited")
    try:
        await limited.start()
        await unlimited.start()
        assert limited.process is not None and unlimited.process is not None
        assert psutil.Process(limited.process.pid).environ()["GOMEMLIMIT"] == "67108864B"
        assert (psutil.Process(unlimited.process.pid).environ().get("GOMEMLIMIT")
                == os.environ.get("GOMEMLIMIT"))
    finally:
        limited.stop()
        unlimited.stop()
