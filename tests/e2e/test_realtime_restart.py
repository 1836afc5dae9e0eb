"""Live events across a kill -9 of realtime_svc, and a cursor the stream no longer holds
(a suite of their own: they kill a service and purge the event stream)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from mailgrid import bus
from tests.e2e.conftest import Suite, is_serving, process_gone
from tests.e2e.live import Live, bearer, deliver, subjects
from tests.e2e.mail import add_user

pytestmark = pytest.mark.e2e


async def user(suite: Suite, address: str) -> str:
    await asyncio.to_thread(add_user, suite, address)
    return await bearer(suite, address)


async def test_sessions_resume_without_loss_across_a_kill_9_of_realtime_svc(
        shared_suite: Suite) -> None:
    rcpt = "restart@example.test"
    token = await user(shared_suite, rcpt)
    sessions = [await Live.open(shared_suite, token) for _ in range(2)]
    for session in sessions:
        await session.until_ready()
    await deliver(shared_suite, rcpt, "before")
    for session in sessions:
        assert subjects(await session.events(1)) == ["before"]

    pid = shared_suite.service_pid("realtime")
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(shared_suite.wait_until, lambda: process_gone(pid),
                            "realtime_svc to die")
    for i in range(3):  # while it is down or restarting
        await deliver(shared_suite, rcpt, f"during {i}")
    await asyncio.to_thread(
        shared_suite.wait_until,
        lambda: shared_suite.service_pid("realtime") != pid
        and is_serving(shared_suite.grpc_addr("realtime")), "realtime_svc restarted")
    await deliver(shared_suite, rcpt, "after")

    # Queued messages are filed by concurrent workers, so their order is the mailbox's,
    # not the SMTP transactions'; every session sees that one order (the stream's).
    seen = [subjects(await session.events(4)) for session in sessions]
    for session in sessions:
        await session.close()
    # The gateway resumed each stream from its cursor: the same socket, nothing lost,
    # nothing twice, and the same order on every session.
    assert sorted(seen[0]) == ["after", "during 0", "during 1", "during 2"]
    assert seen[1] == seen[0]


async def test_a_cursor_older_than_the_event_stream_holds_gets_a_resync(
        shared_suite: Suite) -> None:
    rcpt = "expired@example.test"
    token = await user(shared_suite, rcpt)
    session = await Live.open(shared_suite, token)
    await session.until_ready()
    for i in range(2):
        await deliver(shared_suite, rcpt, f"old {i}")
    first, _ = await session.events(2)
    await session.close()

    # As max_age would, the oldest events go: everything up to now.
    nc = await bus.connect(shared_suite.endpoints().nats_url, "test-purge")
    try:
        js = nc.jetstream()
        head = (await js.stream_info("EVENTS")).state.last_seq
        await js.purge_stream("EVENTS", seq=head + 1)
    finally:
        await nc.close()

    back = await Live.open(shared_suite, token, since=first["cursor"])
    resync = await back.next()
    assert resync["type"] == "resync" and resync["reason"] == "cursor_expired"
    assert await back.close_code() == 4409
    # Reloaded, the client subscribes from the cursor the resync gave, and goes on.
    again = await Live.open(shared_suite, token, since=resync["cursor"])
    assert await again.until_ready() == []
    await deliver(shared_suite, rcpt, "new")
    assert subjects(await again.events(1)) == ["new"]
    await again.close()
