"""mailgrid.crlf: the vectorized line-end scans agree with plain ``bytes`` forms.

The references are the forms the scans replaced: three counts for bare CR/LF (every CRLF
holds one CR and one LF, so any surplus is a bare one) and a search for a dot at a line
start. Hypothesis draws messages from the octets that matter (CR, LF, dot) and others.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgrid.crlf import first_dot_after_lf, has_bare_cr_or_lf
from tests.e2e.test_corpus import corpus_messages


def bare_by_counts(data: bytes) -> bool:
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def dot_after_lf_by_search(data: bytes) -> bool:
    return b"\n." in data


def has_dot_after_lf(data: bytes | bytearray | memoryview) -> bool:
    """The scan as un-stuffing asks it: is there a dot at a line start anywhere? And where
    it says one is, the search finds the same first one."""
    searched = bytes(data).find(b"\n.")
    found = first_dot_after_lf(data, 1)
    assert found == (searched + 1 if searched >= 0 else -1)
    return found >= 0


@pytest.mark.parametrize("data", [
    b"Subject: a\r\n\r\nbody\r\n",
    b"",
    b"no line end at all",
    b"\r\n\r\n\r\n",
    b"a\r\n\r\n.\r\n",
])
def test_crlf_only_messages_have_no_bare_cr_or_lf(data: bytes) -> None:
    assert not has_bare_cr_or_lf(data)


@pytest.mark.parametrize("data", [
    b"Subject: a\n\r\nbody\r\n",          # bare LF
    b"Subject: a\r\n\r\nbody\r\r\n",      # CR CR LF: one bare CR
    b"Subject: a\r\n\r\nbo\rdy\r\n",      # bare CR inside a line
    b"a\r\n.\n",                          # LF-style end of data, smuggling attempt
    b"a\rb\nc\r\n",                       # a bare CR and a bare LF on one line
    b"a\n\rb",                            # as many CRs as LFs, none paired
    b"end\r",
    b"\n",
    b"\r",
])
def test_bare_cr_or_lf_is_found(data: bytes) -> None:
    assert has_bare_cr_or_lf(data)


@pytest.mark.parametrize(("data", "found"), [
    (b"a\r\n.b\r\n", True), (b"a\n.", True), (b"a.b\r\nc.\r\n", False), (b".a", False),
    (b"", False), (b".", False), (b"\n", False)])
def test_a_dot_at_a_line_start_is_found(data: bytes, found: bool) -> None:
    assert has_dot_after_lf(data) is found


messages = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\x00", b"\xff",
                                     b"line of text"]), max_size=60).map(b"".join)


@given(messages)
def test_the_scans_agree_with_the_plain_bytes_forms(data: bytes) -> None:
    assert has_bare_cr_or_lf(data) is bare_by_counts(data)
    assert has_dot_after_lf(data) is dot_after_lf_by_search(data)
    # The SMTP edge hands over bytearrays and slices of them too.
    assert has_bare_cr_or_lf(bytearray(data)) is bare_by_counts(data)
    assert has_bare_cr_or_lf(memoryview(data)[1:]) is bare_by_counts(data[1:])


def test_the_scans_agree_on_every_corpus_message() -> None:
    messages = corpus_messages()
    assert len(messages) >= 200
    for name, data in messages:
        assert has_bare_cr_or_lf(data) is bare_by_counts(data), name
        assert has_dot_after_lf(data) is dot_after_lf_by_search(data), name
