"""An SMTP session's protocol object is freed by reference counting as soon as its
connection is over (gateway.smtp_setup ``_release``), not left in reference cycles for
the cycle collector: the collector is off in these tests, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest

from gateway.smtp import MxSMTP
from mailgrid.settings import Settings
from tests.integration.test_smtp_data_reader import Recorder

MESSAGE = (b"EHLO client.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\n"
           b"DATA\r\n")
BODY = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.asynccontextmanager
async def mx_server(settings: Settings, recorder: Recorder,
                    made: list[weakref.ref[MxSMTP]]) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    sessions: set[MxSMTP] = set()

    def protocol() -> MxSMTP:
        mx = MxSMTP(cast(Any, recorder), settings, loop, sessions, lambda: None)
        made.append(weakref.ref(mx))
        return mx

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def until_freed(refs: list[weakref.ref[MxSMTP]]) -> list[weakref.ref[MxSMTP]]:
    """The refs still alive after the loop has had some turns to end the sessions."""
    for _ in range(100):
        if all(ref() is None for ref in refs):
            break
        await asyncio.sleep(0.01)
    return [ref for ref in refs if ref() is not None]


@pytest.mark.usefixtures("no_cycle_collector")
async def test_a_session_that_sent_a_message_and_quit_is_freed_at_once(
        settings: Settings) -> None:
    recorder, made = Recorder(), list[weakref.ref[MxSMTP]]()
    async with mx_server(settings, recorder, made) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(MESSAGE)
        await asyncio.wait_for(reader.readuntil(b"354 "), 10)
        writer.write(BODY + b"QUIT\r\n")
        replies = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
        await writer.wait_closed()
        assert b"250 2.0.0 Ok: queued" in replies and b"221" in replies
        assert recorder.messages and len(made) == 1
        assert await until_freed(made) == []


@pytest.mark.usefixtures("no_cycle_collector")
async def test_sessions_the_client_drops_are_freed_at_once(settings: Settings) -> None:
    recorder, made = Recorder(), list[weakref.ref[MxSMTP]]()
    async with mx_server(settings, recorder, made) as port:
        for cut_after in (b"220 ", b"250 2.1.5", b"354 "):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if cut_after != b"220 ":
                writer.write(MESSAGE)
            await asyncio.wait_for(reader.readuntil(cut_after), 10)
            writer.transport.abort()  # no QUIT: the server sees the connection go
        assert len(made) == 3
        assert await until_freed(made) == []
