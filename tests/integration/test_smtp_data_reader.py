"""The chunked DATA reader over real sockets: MxSMTP's replies, and the same sessions as
stock aiosmtpd (``SMTP.smtp_DATA``, line by line) for any bytes a client sends.

MxSMTP is served here with a handler that records what it is given: the reader is the
subject, not the MX policy (tests/integration/test_smtp_mx.py covers the whole gateway,
smuggling included).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp import MxSMTP
from gateway.smtp_data import ChunkedDataSMTP
from mailgrid.settings import Settings

LINE_LIMIT = 100
SIZE_LIMIT = 64 * 1024
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\n"
S250_QUEUED = b"250 2.0.0 Ok: queued\r\n"
S354 = b"354 End data with <CR><LF>.<CR><LF>\r\n"


class Recorder:
    """Accepts every recipient and keeps every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes) and envelope.content is content
        self.messages.append(content)
        return "250 2.0.0 Ok: queued"


@contextlib.asynccontextmanager
async def serving(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


class Mx:
    """An MxSMTP listener with a Recorder, its sessions and DATA-done count."""

    def __init__(self, settings: Settings, size_limit: int = SIZE_LIMIT) -> None:
        self.settings = settings.model_copy(update={
            "max_line_length": LINE_LIMIT, "max_message_size": size_limit})
        self.recorder = Recorder()
        self.sessions: set[MxSMTP] = set()
        self.data_done = 0

    def protocol(self) -> MxSMTP:
        return MxSMTP(cast(Any, self.recorder), self.settings, asyncio.get_running_loop(),
                      self.sessions, self._done)

    def _done(self) -> None:
        self.data_done += 1


async def exchange(port: int, *writes: bytes) -> bytes:
    """Every write sent (each drained on its own), then every reply until the server
    closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in writes:
            writer.write(data)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def replies(transcript: bytes) -> list[bytes]:
    """The final lines of the replies, greeting and EHLO left out."""
    lines = transcript.split(b"\r\n")[:-1]
    finals = [line + b"\r\n" for line in lines if line[3:4] == b" "]
    return finals[2:]


@contextlib.asynccontextmanager
async def mx_server(settings: Settings) -> AsyncIterator[tuple[Mx, int]]:
    mx = Mx(settings)
    async with serving(mx.protocol) as port:
        yield mx, port


async def test_the_command_pipelined_after_the_end_of_data_is_the_next_command(
        settings: Settings) -> None:
    async with mx_server(settings) as (mx, port):
        out = await exchange(port, ENVELOPE + b"DATA\r\n",
                             b"Subject: a\r\n\r\none\r\n.\r\nMAIL FROM:<c@example.net>\r\n"
                             b"RCPT TO:<d@example.test>\r\nDATA\r\n",
                             b"two\r\n.\r\nQUIT\r\n")
    assert replies(out) == [b"250 2.0.0 OK\r\n", b"250 2.1.5 Ok\r\n", S354, S250_QUEUED,
                            b"250 2.0.0 OK\r\n", b"250 2.1.5 Ok\r\n", S354, S250_QUEUED,
                            b"221 2.0.0 Bye\r\n"]
    assert mx.recorder.messages == [b"Subject: a\r\n\r\none\r\n", b"two\r\n"]


async def test_the_end_of_data_split_across_writes_anywhere_ends_the_message(
        settings: Settings) -> None:
    body = b"Subject: split\r\n\r\nbody\r\n"
    stream = body + b".\r\n"
    writes = [ENVELOPE + b"DATA\r\n"]
    for cut in range(len(stream) + 1):
        writes += [stream[:cut], stream[cut:] + b"MAIL FROM:<a@example.net>\r\n"
                   b"RCPT TO:<b@example.test>\r\nDATA\r\n"]
    writes.append(b".\r\nQUIT\r\n")
    async with mx_server(settings) as (mx, port):
        out = await exchange(port, *writes)
    assert replies(out).count(S250_QUEUED) == len(stream) + 2
    assert mx.recorder.messages == [body] * (len(stream) + 1) + [b""]


async def test_a_smuggled_end_of_data_stays_inside_the_one_message(
        settings: Settings) -> None:
    smuggled = (b"body\n.\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<x@example.test>\r\n"
                b"DATA\r\nevil\r\n\r.\r\nmore\r\n.\nend\r\n")
    async with mx_server(settings) as (mx, port):
        out = await exchange(port, ENVELOPE + b"DATA\r\n" + smuggled + b".\r\nQUIT\r\n")
    assert replies(out)[-2:] == [S250_QUEUED, b"221 2.0.0 Bye\r\n"]
    # One message: its "\r\n.\n" line is a stuffed dot, not an end.
    assert mx.recorder.messages == [smuggled.replace(b"\r\n.", b"\r\n")]


async def test_dot_stuffed_lines_lose_one_dot(settings: Settings) -> None:
    async with mx_server(settings) as (mx, port):
        await exchange(port, ENVELOPE + b"DATA\r\n..\r\n..x\r\n.y\r\n.\r\nQUIT\r\n")
    assert mx.recorder.messages == [b".\r\n.x\r\ny\r\n"]


async def test_a_line_at_the_limit_passes_and_one_octet_more_gets_500_5_6_0(
        settings: Settings) -> None:
    at_limit = b"a" * (LINE_LIMIT - 2) + b"\r\n"
    over = b"b" * (LINE_LIMIT - 1) + b"\r\n"
    async with mx_server(settings) as (mx, port):
        out = await exchange(port, ENVELOPE + b"DATA\r\n" + at_limit + b".\r\n"
                             + b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\n"
                             + b"DATA\r\n" + over + b".\r\nNOOP\r\nQUIT\r\n")
    assert replies(out)[2:] == [
        S354, S250_QUEUED, b"250 2.0.0 OK\r\n", b"250 2.1.5 Ok\r\n", S354,
        b"500 5.6.0 Line too long (see RFC5321 4.5.3.1.6)\r\n", b"250 2.0.0 OK\r\n",
        b"221 2.0.0 Bye\r\n"]
    assert mx.recorder.messages == [at_limit]


async def test_data_at_the_size_limit_passes_and_one_octet_more_gets_552_5_3_4(
        settings: Settings) -> None:
    line = b"x" * 62 + b"\r\n"
    at_limit = line * (SIZE_LIMIT // 64)
    over = at_limit + b"\r\n"
    assert len(at_limit) == SIZE_LIMIT
    async with mx_server(settings) as (mx, port):
        out = await exchange(port, ENVELOPE + b"DATA\r\n" + at_limit + b".\r\n"
                             + b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\n"
                             + b"DATA\r\n" + over + b".\r\nNOOP\r\nQUIT\r\n")
    assert replies(out)[2:] == [
        S354, S250_QUEUED, b"250 2.0.0 OK\r\n", b"250 2.1.5 Ok\r\n", S354,
        b"552 5.3.4 Error: Too much mail data\r\n", b"250 2.0.0 OK\r\n", b"221 2.0.0 Bye\r\n"]
    assert mx.recorder.messages == [at_limit]


async def test_an_empty_message_is_handed_on_empty(settings: Settings) -> None:
    async with mx_server(settings) as (mx, port):
        out = await exchange(port, ENVELOPE + b"DATA\r\n.\r\nQUIT\r\n")
    assert replies(out)[-2:] == [S250_QUEUED, b"221 2.0.0 Bye\r\n"]
    assert mx.recorder.messages == [b""]


async def test_a_5_mb_message_arrives_intact(settings: Settings) -> None:
    lines = [b"%07d " % n + b"y" * 70 + b"\r\n" for n in range(5 * 1024 * 1024 // 80)]
    lines[::7] = [b"." + line for line in lines[::7]]  # some stuffed dots too
    body = b"".join(lines)
    mx = Mx(settings, size_limit=8 * 1024 * 1024)
    async with serving(mx.protocol) as port:
        out = await exchange(port, ENVELOPE + b"DATA\r\n", body, b".\r\nQUIT\r\n")
    assert replies(out)[-2:] == [S250_QUEUED, b"221 2.0.0 Bye\r\n"]
    assert mx.recorder.messages == [body.replace(b"\r\n.", b"\r\n")[1:]]


async def test_a_connection_lost_inside_data_ends_the_session_and_hands_on_nothing(
        settings: Settings) -> None:
    async with mx_server(settings) as (mx, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ENVELOPE + b"DATA\r\nSubject: cut\r\n\r\nhalf a mess")
        while b"354 " not in await reader.readline():
            pass
        [session] = mx.sessions
        assert session.in_data
        writer.transport.abort()  # a reset, mid-DATA
        for _ in range(500):  # until the server has noticed
            if not mx.sessions and mx.data_done:
                break
            await asyncio.sleep(0.01)
    assert mx.sessions == set()
    assert not session.in_data and mx.data_done == 1
    assert mx.recorder.messages == []


# ---- the same sessions as stock aiosmtpd ----------------------------------------------

class StockSMTP(SMTP):
    line_length_limit = LINE_LIMIT


class ChunkedSMTP(ChunkedDataSMTP):
    line_length_limit = LINE_LIMIT


COMPARED_SIZE_LIMIT = 500
# Few distinct pieces, so that line ends, dots, bare CR/LF and long lines are frequent;
# CRLF ten times as often as the others, or nearly every line would be too long.
_pieces = st.sampled_from([b"\r\n"] * 10 + [
    b"\r", b"\n", b".", b"a", b"\r\n.", b"\n.\r\n", b"\r\n.\r", b"\r\n..\r\n", b"x" * 20,
    b"y" * 97])


def without_end_of_data(data: bytes) -> bytes:
    """``data`` with each end of data made a stuffed-dot line: one message a session."""
    while b"\r\n.\r\n" in data:
        data = data.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    return b"x" + data if data.startswith(b".\r\n") else data


async def both(writes: list[bytes]) -> tuple[tuple[bytes, list[bytes]], ...]:
    results = []
    for cls in (StockSMTP, ChunkedSMTP):
        recorder = Recorder()

        def factory(cls: type[SMTP] = cls, recorder: Recorder = recorder) -> SMTP:
            return cls(recorder, data_size_limit=COMPARED_SIZE_LIMIT,
                       hostname="mx.example.test", ident="test")

        async with serving(factory) as port:
            out = await exchange(port, ENVELOPE + b"DATA\r\n", *writes)
        results.append((out, recorder.messages))
    return tuple(results)


@settings(max_examples=150, deadline=None)
@given(dot=st.booleans(), parts=st.lists(_pieces, max_size=80),
       cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_any_data_gets_the_same_replies_and_message_as_from_stock_aiosmtpd(
        dot: bool, parts: list[bytes], cuts: list[int]) -> None:
    data = without_end_of_data(b"." * dot + b"".join(parts)) + b"\r\n.\r\nNOOP\r\nQUIT\r\n"
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    writes = [data[a:b] for a, b in itertools.pairwise(bounds)]
    stock, chunked = asyncio.run(both(writes))
    assert chunked == stock
    assert stock[0].endswith(b"221 Bye\r\n")
