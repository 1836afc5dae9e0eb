"""realtime_svc alone against a real nats-server: MailEvents published straight onto
mail.events.<user>, read back over its gRPC stream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mailgrid import bus
from mailgrid.grpcutil import channel
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, events_pb2, realtime_pb2, realtime_pb2_grpc
from realtime_svc.app import RealtimeApp

Response = realtime_pb2.SubscribeResponse
WAIT = 20.0


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await bus.connect(nats_url, "test-publisher")
    yield conn
    await conn.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


async def start_app(settings: Settings) -> RealtimeApp:
    app = RealtimeApp(settings)
    await app.start()
    return app


@pytest.fixture
async def realtime(settings: Settings, nats_url: str) -> AsyncIterator[RealtimeApp]:
    app = await start_app(settings.model_copy(update={
        "nats_url": nats_url, "realtime_addr": "127.0.0.1:0", "realtime_session_buffer": 8}))
    yield app
    await app.stop()


@pytest.fixture
async def stub(realtime: RealtimeApp) -> AsyncIterator[realtime_pb2_grpc.RealtimeServiceStub]:
    async with channel(realtime.grpc_addr) as chan:
        yield realtime_pb2_grpc.RealtimeServiceStub(chan)


async def publish(js: JetStreamContext, user_id: str, subject: str, preview: str = "") -> int:
    event = events_pb2.MailEvent(user_id=user_id, message_added=events_pb2.MessageAdded(
        message=common_pb2.MessageSummary(email_id=str(uuid.uuid1()), subject=subject,
                                          preview=preview)))
    return await bus.publish(js, bus.events_subject(user_id), event.SerializeToString(),
                             msg_id=str(uuid.uuid4()))


class Client:
    """One open Subscribe stream, read into a queue by a task of its own."""

    def __init__(self, stub: realtime_pb2_grpc.RealtimeServiceStub, user_id: str,
                 since: int | None = None, read: bool = True) -> None:
        request = realtime_pb2.SubscribeRequest(user_id=user_id)
        if since is not None:
            request.since = since
        self.call: Any = stub.Subscribe(request)
        self.got: asyncio.Queue[Response | None] = asyncio.Queue()
        self.reading = asyncio.Event()
        if read:
            self.reading.set()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self.reading.wait()
                self.got.put_nowait(response)
        finally:
            self.got.put_nowait(None)

    async def next(self) -> Response | None:
        return await asyncio.wait_for(self.got.get(), WAIT)

    async def until_ready(self) -> tuple[list[Response], int]:
        """The catch-up events before ``ready``, and ready's cursor."""
        events: list[Response] = []
        while True:
            response = await self.next()
            assert response is not None, "stream ended before ready"
            if response.WhichOneof("kind") == "ready":
                return events, response.cursor
            events.append(response)

    async def events(self, count: int) -> list[Response]:
        found: list[Response] = []
        while len(found) < count:
            response = await self.next()
            assert response is not None, f"stream ended after {len(found)} of {count}"
            if response.WhichOneof("kind") == "event":
                found.append(response)
        return found

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


def subjects(responses: list[Response]) -> list[str]:
    return [r.event.message_added.message.subject for r in responses]


async def test_live_events_reach_every_session_of_the_user_and_nobody_else(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    laptop, phone, other = Client(stub, "alice"), Client(stub, "alice"), Client(stub, "bob")
    for client in (laptop, phone, other):
        assert (await client.until_ready())[0] == []
    seqs = [await publish(js, "alice", f"a{i}") for i in range(3)]
    bob_seq = await publish(js, "bob", "b0")
    for client in (laptop, phone):
        got = await client.events(3)
        assert subjects(got) == ["a0", "a1", "a2"]
        assert [r.cursor for r in got] == seqs
        assert {r.event.user_id for r in got} == {"alice"}
    got = await other.events(1)  # bob's first event is his own, none of alice's
    assert subjects(got) == ["b0"] and got[0].cursor == bob_seq
    for client in (laptop, phone, other):
        await client.close()


async def test_resuming_from_a_cursor_gets_exactly_the_missed_events_then_live_ones(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    first = await publish(js, "alice", "seen")
    await publish(js, "bob", "not alice's")
    missed = [await publish(js, "alice", f"missed{i}") for i in range(3)]
    client = Client(stub, "alice", since=first)
    caught_up, cursor = await client.until_ready()
    assert subjects(caught_up) == ["missed0", "missed1", "missed2"]
    assert [r.cursor for r in caught_up] == missed and cursor >= missed[-1]
    live = await publish(js, "alice", "live")
    got = await client.events(1)
    assert subjects(got) == ["live"] and got[0].cursor == live
    await client.close()


async def test_a_resume_from_the_last_cursor_repeats_nothing(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    last = [await publish(js, "alice", f"m{i}") for i in range(2)][-1]
    client = Client(stub, "alice", since=last)
    caught_up, cursor = await client.until_ready()
    assert caught_up == [] and cursor == last
    await client.close()


async def test_without_a_cursor_only_new_events_come_after_a_ready_with_a_cursor(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    old = await publish(js, "alice", "old")
    client = Client(stub, "alice")
    caught_up, cursor = await client.until_ready()
    assert caught_up == [] and cursor == old
    await publish(js, "alice", "new")
    assert subjects(await client.events(1)) == ["new"]
    await client.close()


async def test_a_cursor_older_than_the_stream_holds_gets_a_resync(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    seqs = [await publish(js, "alice", f"m{i}") for i in range(4)]
    await js.purge_stream("EVENTS", seq=seqs[2])  # as max_age would: the oldest go
    client = Client(stub, "alice", since=seqs[0])
    response = await client.next()
    assert response is not None and response.WhichOneof("kind") == "resync"
    assert response.resync.reason == realtime_pb2.RESYNC_REASON_CURSOR_EXPIRED
    assert response.cursor == seqs[-1]
    assert await client.next() is None  # the stream ends
    # From the cursor the resync gives, the client resumes normally.
    again = Client(stub, "alice", since=response.cursor)
    assert (await again.until_ready())[0] == []
    await again.close()


async def test_a_cursor_ahead_of_the_stream_gets_a_resync(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    head = await publish(js, "alice", "m")
    client = Client(stub, "alice", since=head + 1000)
    response = await client.next()
    assert response is not None
    assert response.resync.reason == realtime_pb2.RESYNC_REASON_CURSOR_UNKNOWN
    assert await client.next() is None


async def test_a_bad_user_id_is_invalid_argument(
        stub: realtime_pb2_grpc.RealtimeServiceStub) -> None:
    for user_id in ("", "a.b", "*", "a>"):
        call: Any = stub.Subscribe(realtime_pb2.SubscribeRequest(user_id=user_id))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_client_too_far_behind_is_told_to_resync_without_stalling_others(
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    fast = Client(stub, "alice")
    slow = Client(stub, "alice")
    await fast.until_ready()
    await slow.until_ready()
    slow.reading.clear()  # stops reading: gRPC flow control then backs up to its queue
    # Big events fill the transport's windows quickly; the session buffer holds 8.
    count = 120
    for i in range(count):
        await publish(js, "alice", f"m{i}", preview="x" * 60_000)
    assert subjects(await fast.events(count)) == [f"m{i}" for i in range(count)]
    slow.reading.set()
    seen: list[Response] = []
    while (response := await slow.next()) is not None:
        seen.append(response)
    kinds = [r.WhichOneof("kind") for r in seen]
    assert kinds[-1] == "resync", kinds
    assert seen[-1].resync.reason == realtime_pb2.RESYNC_REASON_TOO_SLOW
    events = [r for r in seen if r.WhichOneof("kind") == "event"]
    assert len(events) < count
    assert subjects(events) == [f"m{i}" for i in range(len(events))]  # a gapless prefix
    await fast.close()


async def test_two_instances_serve_the_same_user_alike(
        realtime: RealtimeApp, settings: Settings, nats_url: str,
        stub: realtime_pb2_grpc.RealtimeServiceStub, js: JetStreamContext) -> None:
    other = await start_app(settings.model_copy(update={
        "nats_url": nats_url, "realtime_addr": "127.0.0.1:0"}))
    try:
        async with channel(other.grpc_addr) as chan:
            here = Client(stub, "alice")
            there = Client(realtime_pb2_grpc.RealtimeServiceStub(chan), "alice")
            await here.until_ready()
            await there.until_ready()
            seqs = [await publish(js, "alice", f"m{i}") for i in range(3)]
            for client in (here, there):
                assert [r.cursor for r in await client.events(3)] == seqs
                await client.close()
    finally:
        await other.stop()


async def test_events_published_while_its_nats_connection_is_down_still_arrive(
        realtime: RealtimeApp, stub: realtime_pb2_grpc.RealtimeServiceStub,
        js: JetStreamContext) -> None:
    client = Client(stub, "alice")
    await client.until_ready()
    nc: Any = realtime._nc
    reconnects = nc.stats["reconnects"]
    nc._transport.close()  # the connection drops; nats-py reconnects
    seqs = [await publish(js, "alice", f"m{i}") for i in range(3)]
    got = await client.events(3)
    assert [r.cursor for r in got] == seqs
    assert nc.stats["reconnects"] > reconnects
    await client.close()


async def test_the_last_session_of_a_user_leaving_drops_the_feed(
        realtime: RealtimeApp, stub: realtime_pb2_grpc.RealtimeServiceStub) -> None:
    client = Client(stub, "alice")
    await client.until_ready()
    assert realtime.hub is not None and set(realtime.hub.feeds) == {"alice"}
    await client.close()
    for _ in range(200):
        if not realtime.hub.feeds:
            break
        await asyncio.sleep(0.01)
    assert realtime.hub.feeds == {}


async def test_an_idle_stream_gets_heartbeats_carrying_its_cursor(
        settings: Settings, nats_url: str, js: JetStreamContext) -> None:
    app = await start_app(settings.model_copy(update={
        "nats_url": nats_url, "realtime_addr": "127.0.0.1:0", "events_heartbeat": 0.1}))
    try:
        async with channel(app.grpc_addr) as chan:
            seq = await publish(js, "alice", "m")
            client = Client(realtime_pb2_grpc.RealtimeServiceStub(chan), "alice", since=seq)
            assert await client.until_ready() == ([], seq)
            beat = await client.next()
            assert beat is not None and beat.WhichOneof("kind") == "heartbeat"
            assert beat.cursor == seq
            await client.close()
    finally:
        await app.stop()
