"""The chunked DATA reader (gateway.smtp_data) fed in controlled pieces.

The reader works on an asyncio.StreamReader; here the pieces are fed with feed_data, one
event-loop step apart, so every split of the input is exercised exactly. ``reference``
restates aiosmtpd 1.4.6's line-by-line DATA loop (aiosmtpd/smtp.py, smtp_DATA); the
comparison with aiosmtpd itself over real sockets is in
tests/integration/test_smtp_data_reader.py.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp_data import DataReader, Verdict, has_long_line, unstuff

LINE_LIMIT = 40
SIZE_LIMIT = 200


@dataclass
class Outcome:
    verdict: Verdict | None  # None: the stream ended before the end of data
    content: bytes
    rest: bytes  # what stays in the reader after the end of data


def reference(stream: bytes, line_limit: int, size_limit: int | None) -> Outcome:
    """aiosmtpd's rules, one line at a time."""
    pos, total, verdict, lines = 0, 0, Verdict.OK, []
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return Outcome(None, b"", b"")
        line, pos = stream[pos:end + 2], end + 2
        if line == b".\r\n":
            break
        if verdict is Verdict.OK and len(line) > line_limit + 2:
            verdict = Verdict.TOO_LONG  # its StreamReader overruns before counting
        total += len(line)
        if verdict is Verdict.OK and size_limit and total > size_limit:
            verdict = Verdict.TOO_MUCH
        if verdict is Verdict.OK and len(line) > line_limit:
            verdict = Verdict.TOO_LONG
        if verdict is Verdict.OK:
            lines.append(line[1:] if line.startswith(b".") else line)
    content = b"".join(lines) if verdict is Verdict.OK else b""
    return Outcome(verdict, content, stream[pos:])


async def read(pieces: list[bytes], line_limit: int = LINE_LIMIT,
               size_limit: int | None = SIZE_LIMIT) -> Outcome:
    stream = asyncio.StreamReader(limit=line_limit)
    task = asyncio.create_task(DataReader(stream).read(line_limit, size_limit))
    for piece in pieces:
        await asyncio.sleep(0)  # the reader takes what has arrived so far
        stream.feed_data(piece)
    await asyncio.sleep(0)
    stream.feed_eof()
    try:
        data = await task
    except asyncio.IncompleteReadError:
        return Outcome(None, b"", b"")
    content = data.content() if data.verdict is Verdict.OK else b""
    return Outcome(data.verdict, content, await stream.read())


def splits(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(len(data) + 1)]


MESSAGE = b"Subject: x\r\n\r\nbody\r\n"
PIPELINED = b"MAIL FROM:<a@example.net>\r\n"


@pytest.mark.parametrize("pieces", splits(MESSAGE + b".\r\n" + PIPELINED))
async def test_the_end_of_data_split_anywhere_ends_the_message(pieces: list[bytes]) -> None:
    assert await read(pieces) == Outcome(Verdict.OK, MESSAGE, PIPELINED)


async def test_the_message_dripped_byte_by_byte_ends_at_the_end_of_data() -> None:
    stream = MESSAGE + b".\r\n" + PIPELINED
    pieces = [stream[i:i + 1] for i in range(len(stream))]
    assert await read(pieces) == Outcome(Verdict.OK, MESSAGE, PIPELINED)


@pytest.mark.parametrize("smuggled_end", [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n",
    b"\r\n.\r\r\n"])
async def test_a_smuggled_end_of_data_is_message_content(smuggled_end: bytes) -> None:
    inner = b"body" + smuggled_end + b"MAIL FROM:<evil@example.net>\r\n"
    # Only a dot at a line start (after CRLF) is a stuffed one.
    unstuffed = inner.replace(b"\r\n.", b"\r\n")
    assert await read([inner + b".\r\n"], size_limit=None) == Outcome(Verdict.OK, unstuffed,
                                                                        b"")


async def test_an_end_of_data_right_after_the_command_is_an_empty_message() -> None:
    assert await read([b".\r\nQUIT\r\n"]) == Outcome(Verdict.OK, b"", b"QUIT\r\n")


async def test_one_leading_dot_is_removed_from_every_line() -> None:
    stuffed = b"..\r\n...x\r\n.y\r\nz.\r\n"
    assert await read([stuffed + b".\r\n"]) == Outcome(Verdict.OK, b".\r\n..x\r\ny\r\nz.\r\n",
                                                       b"")


@pytest.mark.parametrize(("length", "verdict"), [
    (LINE_LIMIT, Verdict.OK), (LINE_LIMIT + 1, Verdict.TOO_LONG),
    (LINE_LIMIT + 3, Verdict.TOO_LONG), (10 * LINE_LIMIT, Verdict.TOO_LONG)])
async def test_a_line_over_the_limit_with_its_crlf_is_too_long(length: int,
                                                                verdict: Verdict) -> None:
    line = b"x" * (length - 2) + b"\r\n"
    result = await read([line + b".\r\nNOOP\r\n"])
    assert (result.verdict, result.rest) == (verdict, b"NOOP\r\n")
    assert result.content == (line if verdict is Verdict.OK else b"")


async def test_a_long_line_dripped_in_is_too_long_and_the_session_goes_on() -> None:
    stream = b"x" * (5 * LINE_LIMIT) + b"\r\n.\r\nNOOP\r\n"
    pieces = [stream[i:i + 1] for i in range(len(stream))]
    assert await read(pieces) == Outcome(Verdict.TOO_LONG, b"", b"NOOP\r\n")


@pytest.mark.parametrize(("size", "verdict"), [
    (SIZE_LIMIT, Verdict.OK), (SIZE_LIMIT + 1, Verdict.TOO_MUCH)])
async def test_data_over_the_size_limit_is_too_much(size: int, verdict: Verdict) -> None:
    data = (b"x" * 18 + b"\r\n") * 9 + b"y" * (size - 180 - 2) + b"\r\n"
    assert len(data) == size
    result = await read([data + b".\r\n"])
    assert result.verdict is verdict


@pytest.mark.parametrize(("length", "verdict"), [
    # A line one or two octets over the line limit is counted in the size first ...
    (LINE_LIMIT + 2, Verdict.TOO_MUCH),
    # ... a longer one overruns aiosmtpd's StreamReader before it is counted.
    (LINE_LIMIT + 3, Verdict.TOO_LONG)])
async def test_a_line_over_both_limits_gets_the_verdict_aiosmtpd_gives(
        length: int, verdict: Verdict) -> None:
    before = b"x" * 28 + b"\r\n"  # 30 octets a line
    line = b"z" * (length - 2) + b"\r\n"
    data = before * 6 + line  # 180 + length > SIZE_LIMIT
    assert (await read([data + b".\r\n"])).verdict is verdict
    assert reference(data + b".\r\n", LINE_LIMIT, SIZE_LIMIT).verdict is verdict


async def test_data_over_the_limit_is_dropped_as_it_arrives() -> None:
    stream = asyncio.StreamReader(limit=LINE_LIMIT)
    task = asyncio.create_task(DataReader(stream).read(LINE_LIMIT, SIZE_LIMIT))
    for _ in range(100):
        stream.feed_data(b"x" * 30 + b"\r\n")
        await asyncio.sleep(0)
    stream.feed_data(b".\r\n")
    data = await task
    assert data.verdict is Verdict.TOO_MUCH
    assert data.pieces == []  # nothing of the 3,200 octets was kept
    assert data.size == 3200


async def test_a_stream_ending_inside_data_raises_incomplete_read() -> None:
    assert await read([MESSAGE, b"no end"]) == Outcome(None, b"", b"")


def test_has_long_line_finds_a_line_over_the_limit_anywhere() -> None:
    lines = [b"a" * n + b"\r\n" for n in (0, 10, 38, 5, 38)]
    assert not has_long_line(b"".join(lines), 40)
    for i in range(len(lines) + 1):
        assert has_long_line(b"".join([*lines[:i], b"b" * 39 + b"\r\n", *lines[i:]]), 40)


def test_unstuff_removes_one_dot_per_line() -> None:
    assert unstuff(b".a\r\n..b\r\nc.\r\n.\r\n") == b"a\r\n.b\r\nc.\r\n\r\n"


# Few distinct pieces, so that line ends, dots and bare CR/LF are frequent; CRLF more
# often than the others, or nearly every line would be too long.
_octets = st.sampled_from([b"\r\n"] * 6 + [
    b"\r", b"\n", b".", b"a", b"\r\n.", b"\r\n.\r\n", b"x" * 17, b"y" * 39, b"z" * 45])


@settings(max_examples=300, deadline=None)
@given(dot=st.booleans(), parts=st.lists(_octets, max_size=60),
       cuts=st.lists(st.integers(0, 400), max_size=6),
       size_limit=st.sampled_from([None, 0, 50, SIZE_LIMIT]))
def test_the_reader_agrees_with_aiosmtpds_rules_however_the_data_arrives(
        dot: bool, parts: list[bytes], cuts: list[int], size_limit: int | None) -> None:
    stream = b"." * dot + b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    got = asyncio.run(read(pieces, LINE_LIMIT, size_limit))
    assert got == reference(stream, LINE_LIMIT, size_limit)
