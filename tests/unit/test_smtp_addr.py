"""The fast path reader agrees with aiosmtpd's parser on every input it takes."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp_addr import FastAddrSMTP

ALPHABET = "aZ09.-_+@<>\"() :,[]\\=é!#%/\t"


def _servers() -> tuple[SMTP, FastAddrSMTP]:
    loop = asyncio.new_event_loop()
    try:
        return SMTP(object(), loop=loop), FastAddrSMTP(object(), loop=loop)
    finally:
        loop.close()


STOCK, FAST = _servers()


def _outcome(server: SMTP, arg: str) -> object:
    """The answer, or the type of what it raised (aiosmtpd's parser raises on some
    inputs; the fast path must then raise the same, by falling back to it)."""
    try:
        return server._getaddr(arg)
    except Exception as err:
        return type(err)


@given(st.text(alphabet=ALPHABET, max_size=30))
@settings(max_examples=1500, deadline=None)
def test_fast_path_reads_every_path_as_aiosmtpd_does(arg: str) -> None:
    assert _outcome(FAST, arg) == _outcome(STOCK, arg)


@given(st.from_regex(r"<[a-z0-9.+-]{1,12}@[a-z0-9-]{1,8}(\.[a-z0-9-]{1,8}){0,3}>"
                     r"( [A-Z]+=[A-Za-z0-9]+)?", fullmatch=True))
@settings(max_examples=1000, deadline=None)
def test_fast_path_agrees_on_address_shaped_paths(arg: str) -> None:
    assert FAST._getaddr(arg) == STOCK._getaddr(arg)


def test_common_paths_read_as_expected() -> None:
    assert FAST._getaddr("<bob@example.test> SIZE=100") == ("bob@example.test", "SIZE=100")
    assert FAST._getaddr("<>") == STOCK._getaddr("<>")
    assert FAST._getaddr('<"odd user"@example.test>') == \
        STOCK._getaddr('<"odd user"@example.test>')
    local = "x" * 65
    FAST.local_part_limit = STOCK.local_part_limit = 64
    try:
        assert FAST._getaddr(f"<{local}@example.test>") == (None, None) == \
            STOCK._getaddr(f"<{local}@example.test>")
    finally:
        FAST.local_part_limit = STOCK.local_part_limit = 0
