"""The DATA reader's dot scans (gateway.smtp_data) agree with the plain searches they
stand for: the end of data with ``find(b"\\r\\n.\\r\\n")``, un-stuffing with
``replace(b"\\r\\n.", b"\\r\\n")``. Hypothesis draws bodies dense in dots and in lines
that start with one, so that every stage is reached: the hops from dot to dot, the byte
masks after DOT_HOPS dots, the plain search after STUFFED_LINES such lines."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from gateway.smtp_data import DOT_HOPS, STUFFED_LINES, DataReader, unstuff
from tests.e2e.test_corpus import corpus_messages

END = b"\r\n.\r\n"


def end_by_search(buf: bytes, at_line_start: bool, start: int) -> int:
    if at_line_start and buf[:3] == b".\r\n":
        return 0
    found = buf.find(END, start)
    return found + 2 if found >= 0 else -1


def unstuff_by_replace(data: bytes) -> bytes:
    return (data[1:] if data[:1] == b"." else data).replace(b"\r\n.", b"\r\n")


bodies = st.lists(st.sampled_from([b"\r\n", b".", b"\r\n.", b"\r\n..", END, b"\n.", b"\r.",
                                   b"a", b"x" * 40]), max_size=300).map(b"".join)


@given(bodies, st.integers(min_value=0, max_value=8))
def test_the_end_of_data_is_where_the_plain_search_finds_it(body: bytes, start: int) -> None:
    start = min(start, len(body))
    found = DataReader._end(bytearray(body), start == 0, start)
    assert found == end_by_search(body, start == 0, start)


@given(bodies)
def test_unstuffing_is_the_plain_replace(body: bytes) -> None:
    assert unstuff(body) == unstuff_by_replace(body)


def test_every_stage_is_reached_and_agrees() -> None:
    header = b"Received: from a.example.net (b.example.net [192.0.2.1])\r\n" * 5
    base64_body = base64.encodebytes(bytes(range(256)) * 300).replace(b"\n", b"\r\n")
    cases = {
        "no dot after the header": header + b"\r\n" + base64_body,
        "more dots than hops": header + b"a.b " * (DOT_HOPS * 4) + b"\r\n" + base64_body,
        "more stuffed lines than tried": b"..x\r\n" * (STUFFED_LINES * 3) + base64_body,
    }
    for name, body in cases.items():
        data = body + END
        assert DataReader._end(bytearray(data), True, 0) == len(body) + 2, name
        assert unstuff(body) == unstuff_by_replace(body), name


def test_the_scans_agree_on_every_corpus_message() -> None:
    for name, raw in corpus_messages():
        data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert unstuff(data) == unstuff_by_replace(data), name
        framed = bytearray(data + END)
        assert DataReader._end(framed, True, 0) == end_by_search(bytes(framed), True, 0), name
