"""The DATA command (RFC 5321 4.1.1.4) reading the message in large pieces.

aiosmtpd 1.4.6 reads DATA with one ``readuntil(b"\\r\\n")`` per line: several
milliseconds of CPU for a 100 KB message. ``ChunkedDataSMTP.smtp_DATA`` takes whatever
the StreamReader holds at once and finds line ends and the end of data with
``bytes.find`` and byte masks (``_line_start_dot``); the rules are aiosmtpd's, exactly
(tests/integration/test_smtp_data_reader.py compares the two over real sockets):

- lines end with CRLF only; the end of data is a line that is exactly ``.`` CRLF, so
  only ``<CRLF>.<CRLF>`` (or ``.<CRLF>`` right after the DATA command) ends it. A bare
  CR or LF never does (SMTP smuggling, CVE-2023-51764 and kin);
- one leading ``.`` is removed from every line (RFC 5321 4.5.2);
- a line longer than ``line_length_limit`` octets with its CRLF gets ``500 Line too
  long`` and more than ``data_size_limit`` octets (the lines before the end, counted
  before un-stuffing) ``552 Too much mail data``; both only once the end of data has
  arrived (RFC 5321 4.2.5), the data read meanwhile being discarded, and when a line
  is both, the first limit aiosmtpd's line-by-line reader trips wins (``_verdict``);
- what the client sent after the end of data stays in the reader: it is the next
  command (PIPELINING, RFC 2920).
"""

from __future__ import annotations

import asyncio
import enum
import logging

from aiosmtpd.smtp import MISSING, SMTP, syntax

from mailgrid.crlf import first_dot_after_lf

log = logging.getLogger(__name__)

CRLF = b"\r\n"
LF = 10
# The end of data after a line end, and alone at the start of the data.
END_AFTER_LINE = b"\r\n.\r\n"
END_AT_START = b".\r\n"
# Both the end of data and dot-stuffing are about dots at a line start. A search for
# "\r\n.\r\n" steps a few octets at a time where the bytes hold CRLFs: 45 µs per 100 KB
# of base64 (the usual form of a large message) or of text. A memchr from dot to dot
# crosses a body without dots in 3, so both go from dot to dot first, for this many
# dots, then leave the rest to byte masks (15-20 µs per 100 KB whatever the text).
DOT_HOPS = 16
STUFFED_LINES = 4

R_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
R_TOO_MUCH_DATA = "552 Error: Too much mail data"


class Verdict(enum.Enum):
    OK = "ok"
    TOO_LONG = "line too long"
    TOO_MUCH = "too much data"


def has_long_line(lines: bytes | bytearray, limit: int) -> bool:
    """True when one of ``lines`` (whole lines, each ending in CRLF) is longer than
    ``limit`` octets with its CRLF.

    A line that lies within a window of ``limit`` octets is short enough, so each step
    skips past the last CRLF of the window at the current line's start: a few C-level
    searches per ``limit`` octets instead of one per line.
    """
    start, size = 0, len(lines)
    while size - start > limit:
        last = lines.rfind(CRLF, start, start + limit)
        if last < 0:
            return True
        start = last + 2
    return False


def _verdict(lines: bytes | bytearray, before: int, line_limit: int,
             size_limit: int | None) -> Verdict:
    """Which limit aiosmtpd's line-by-line reader trips first in ``lines``, given
    ``before`` octets of data before them.

    Its StreamReader overruns on a line of more than ``line_limit`` octets before the
    CRLF (too long, whatever the size); a line of one or two octets more is counted in
    the size first and found too long only after that.
    """
    total, start = before, 0
    while start < len(lines):
        end = lines.find(CRLF, start) + 2
        length = end - start
        if length > line_limit + 2:
            return Verdict.TOO_LONG
        total += length
        if size_limit and total > size_limit:
            return Verdict.TOO_MUCH
        if length > line_limit:
            return Verdict.TOO_LONG
        start = end
    return Verdict.OK


def unstuff(data: bytes) -> bytes:
    """``data`` with one leading ``.`` removed from every line (RFC 5321 4.5.2)."""
    if data[:1] == b".":
        data = data[1:]
    # Most messages have nothing to undo: finding that out is far cheaper than
    # replace's own search for "\r\n." (slowed by every CRLF it passes).
    if _line_start_dot(data, 1) < 0:
        return data
    return data.replace(b"\r\n.", CRLF)


def _line_start_dot(data: bytes | bytearray, start: int) -> int:
    """The offset of the first dot right after a LF at ``start`` (at least 1) or later,
    or -1: from dot to dot with memchr for DOT_HOPS dots, then by byte masks."""
    dot = data.find(b".", start)
    for _ in range(DOT_HOPS):
        if dot < 0 or data[dot - 1] == LF:
            return dot
        dot = data.find(b".", dot + 1)
    return -1 if dot < 0 else first_dot_after_lf(data, dot)


class _Collector:
    """The data lines read so far, or only their count once a limit is exceeded."""

    def __init__(self, line_limit: int, size_limit: int | None) -> None:
        self.line_limit = line_limit
        self.size_limit = size_limit
        self.verdict = Verdict.OK
        self.size = 0
        self.pieces: list[bytes | bytearray] = []

    def lines(self, lines: bytes | bytearray) -> None:
        """Whole lines (each ending in CRLF, the first at a line start)."""
        if self.verdict is Verdict.OK:
            size = self.size + len(lines)
            if ((self.size_limit and size > self.size_limit)
                    or has_long_line(lines, self.line_limit)):
                self._over(_verdict(lines, self.size, self.line_limit, self.size_limit))
            else:
                self.pieces.append(lines)
        self.size += len(lines)

    def long_line_start(self, part: bytes | bytearray) -> None:
        """The start of a line already known to overrun the line limit."""
        if self.verdict is Verdict.OK:
            self._over(Verdict.TOO_LONG)
        self.size += len(part)

    def _over(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.pieces = []  # discarded at once: memory stays bounded

    def content(self) -> bytes:
        return unstuff(b"".join(self.pieces))


class DataReader:
    """Reads DATA from the StreamReader's buffer, as much as has arrived at a time.

    The one place that touches asyncio.StreamReader internals (``_buffer``, ``_eof``,
    ``_exception``, ``_wait_for_data``, ``_maybe_resume_transport``; CPython 3.11's
    streams.py), as aiosmtpd itself does (``self._reader._buffer.clear()``): the public
    API reads a line or a count, not "everything buffered up to a pattern".
    """

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream

    async def read(self, line_limit: int, size_limit: int | None) -> _Collector:
        """Data up to the end of data; the end itself and what follows it stay unread.

        Raises what the stream's own reads raise: its exception once set, and
        ``IncompleteReadError`` at EOF (aiosmtpd cancels the reading task first).
        """
        stream = self.stream
        into = _Collector(line_limit, size_limit)
        at_line_start = True
        # Octets at the start of the buffer already searched: they hold no CRLF but
        # maybe in their last octet (a line dripping in is not searched again and again).
        searched = 0
        while True:
            if stream._exception is not None:  # type: ignore[attr-defined]
                raise stream._exception  # type: ignore[attr-defined]
            buf: bytearray = stream._buffer  # type: ignore[attr-defined]
            end = self._end(buf, at_line_start, max(0, searched - 1))
            if end >= 0:
                if at_line_start:
                    into.lines(buf[:end])
                else:
                    into.long_line_start(buf[:end])
                del buf[:end + len(END_AT_START)]
                stream._maybe_resume_transport()  # type: ignore[attr-defined]
                return into
            last = buf.rfind(CRLF, max(0, searched - 1))
            if last >= 0:
                whole = last + 2
                if at_line_start:
                    into.lines(buf[:whole])
                else:
                    into.long_line_start(buf[:whole])
                del buf[:whole]
                at_line_start = True
            if len(buf) >= line_limit + 2:
                # No CRLF in more than the limit plus one: this line overruns whatever
                # follows. Keep its last octet, it may be the CR of its CRLF.
                into.long_line_start(buf[:-1])
                del buf[:-1]
                at_line_start = False
            searched = len(buf)
            stream._maybe_resume_transport()  # type: ignore[attr-defined]
            if stream._eof:  # type: ignore[attr-defined]
                partial = bytes(buf)
                buf.clear()
                raise asyncio.IncompleteReadError(partial, None)
            await stream._wait_for_data("DataReader.read")  # type: ignore[attr-defined]

    @staticmethod
    def _end(buf: bytearray, at_line_start: bool, start: int) -> int:
        """Where the data before the end of data stops in ``buf``, or -1."""
        if at_line_start and buf[:3] == END_AT_START:
            return 0
        dot = _line_start_dot(buf, start + 2)
        # Lines a client starts with a dot are rare; past a few, the plain search.
        for _ in range(STUFFED_LINES):
            if dot < 0 or buf[dot - 2:dot + 3] == END_AFTER_LINE:
                return dot
            dot = _line_start_dot(buf, dot + 1)
        if dot < 0:
            return -1
        found = buf.find(END_AFTER_LINE, dot - 2)
        return found + 2 if found >= 0 else -1


class ChunkedDataSMTP(SMTP):
    """aiosmtpd's SMTP with a DATA command that reads the message in large pieces.

    A copy of aiosmtpd 1.4.6's ``smtp_DATA`` (pinned in pyproject.toml) around
    ``DataReader``; ``decode_data=True`` and the deprecated ``process_message`` hook are
    not supported (mailgrid uses neither).
    """

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data = await DataReader(self._reader).read(self.line_length_limit,
                                                       self.data_size_limit)
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if data.verdict is not Verdict.OK:
            await self.push(R_LINE_TOO_LONG if data.verdict is Verdict.TOO_LONG
                            else R_TOO_MUCH_DATA)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = data.content()
        self.envelope.content = content
        self.envelope.original_content = content
        status = (await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks
                  else MISSING)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
