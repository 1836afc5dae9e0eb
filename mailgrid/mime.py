"""MIME parsing for the inbound and send paths: raw RFC 5322 bytes → ParsedMessage.

Pure functions, no I/O. The parse never raises: mail from the internet is often broken
(bad boundaries, bad encodings, malformed headers), and a broken message must still be
filed and shown with whatever could be read. Everything that could not be read is
recorded as a human-readable parse problem; the raw bytes are kept elsewhere, intact.

The standard library does the parsing (``email.policy.default``), under limits:
- headers whose structured parse is quadratic (address lists) are parsed the lenient
  compat32 way past a size bound;
- multipart nesting deeper than ``max_depth`` and more than ``max_parts`` parts are not
  descended into; the input is cut before the parser sees an unbounded structure, so the
  time a parse takes is bounded by the message size, not by its shape.
"""

from __future__ import annotations

import codecs
import email.errors
import email.header
import email.policy
import email.utils
import html.parser
import io
import logging
import mailbox
import mimetypes
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path

from mailgrid.v1 import common_pb2, metadata_pb2

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# A structured parse of an address header is quadratic in its length (CPython's
# _header_value_parser); longer headers are parsed the compat32 way instead.
MAX_STRUCTURED_HEADER = 32 * 1024
# Caps on what one message may put into a mailbox row.
MAX_ADDRESSES = 1000
MAX_REFERENCES = 500
MAX_SUBJECT_CHARS = 4096
MAX_NAME_CHARS = 512
MAX_PROBLEMS = 100
PREVIEW_CHARS = 200

_ADDRESS_FIELDS = ("from", "to", "cc", "bcc", "reply-to")
_PLAIN_TEXT = re.compile(r"[ -~]*")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_SIMPLE_MAILBOX = re.compile(
    rf"(?:({_ATOM}(?: {_ATOM})*) )?<({_DOT_ATOM}@{_DOT_ATOM})>|({_DOT_ATOM}@{_DOT_ATOM})")
_MSG_ID = re.compile(r"<([^<>\s]+)>")
_SPACE = re.compile(r"\s+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# A boundary parameter (RFC 2046 5.1.1), quoted or not.
_DASH_LINE = re.compile(rb"^--([^\r\n]*)", re.MULTILINE)
_BOUNDARY_PARAM = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))')
# A header block of well-formed fields and their continuation lines, each ending in CRLF
# (no bare CR or LF): what single_part takes.
_HEADER_BLOCK = re.compile(
    rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r\n(?:(?:[\x21-\x39\x3b-\x7e]+:|[ \t])[^\r\n]*\r\n)*")
_NESTING_HEADER = re.compile(rb"^content-type:[ \t]*(multipart|message)/", re.MULTILINE | re.I)

Problem = Callable[[str], None]


@dataclass
class ParsedEmail:
    """What a parse read: the message fields, and each attachment's decoded bytes.

    ``attachment_data[i]`` belongs to ``message.attachments[i]``; the attachments'
    ``blob_key`` is left empty for the caller to fill after storing the bytes.
    """

    message: metadata_pb2.ParsedMessage
    attachment_data: list[bytes] = field(default_factory=list)


def parse_message(raw: bytes, *, max_depth: int = 50, max_parts: int = 1000,
                  max_body_bytes: int = MiB) -> ParsedEmail:
    """Parses ``raw`` into a ParsedEmail. Never raises for any input bytes."""
    try:
        return _Parser(max_depth, max_parts, max_body_bytes).parse(bytes(raw))
    except Exception as err:  # the last guard: a bug here must not lose the message
        log.exception("MIME parse failed")
        parsed = metadata_pb2.ParsedMessage()
        parsed.parse_problems.append(f"message could not be parsed: {_describe(err)}")
        return ParsedEmail(parsed)


def split_mbox(data: bytes) -> list[bytes]:
    """The messages of an mbox file, each without its "From " separator line.

    Uses the standard ``mailbox.mbox`` reader (mboxrd/mboxo quoting is left as stored).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.mbox"
        path.write_bytes(data)
        box = mailbox.mbox(str(path), create=False)
        try:
            return [box.get_bytes(key) for key in box.iterkeys()]
        finally:
            box.close()


def html_to_text(markup: str) -> str:
    """The readable text of an HTML body, whitespace left as found (never raises)."""
    extractor = _TextExtractor()
    try:
        extractor.feed(markup)
        extractor.close()
    except Exception:  # html.parser is lenient, but keep what was read on any failure
        pass
    return "".join(extractor.chunks)


def make_preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """The first ``limit`` characters of ``text`` with whitespace collapsed."""
    # split() and the regex \s agree on what whitespace is (Py_UNICODE_ISSPACE); split
    # runs at C speed where the regex steps through every character.
    # A short window first: its collapse is a prefix of the longer one's (a word cut at
    # its end is a prefix of that word), so once it is over the limit it decides alone.
    collapsed = " ".join(text[: limit * 2].split())
    if len(collapsed) <= limit:
        collapsed = " ".join(text[: limit * 20].split())
        if len(collapsed) <= limit:
            return collapsed
    return collapsed[: limit - 1].rstrip() + "…"


class _Parser:
    """One parse; collects problems as it goes."""

    def __init__(self, max_depth: int, max_parts: int, max_body_bytes: int) -> None:
        self.max_depth = max(1, max_depth)
        self.max_parts = max(1, max_parts)
        self.max_body_bytes = max(0, max_body_bytes)
        self.out = metadata_pb2.ParsedMessage()
        self.attachment_data: list[bytes] = []
        self.problems: list[str] = []
        self.parts_seen = 0
        self.limit_noted = False
        self.text: str | None = None
        self.html: str | None = None
        self.raw_headers: dict[str, object] | None = None

    # entry

    def parse(self, raw: bytes) -> ParsedEmail:
        root = self._parse_tree(raw)
        self._headers(root)
        self._walk(root, depth=1, path="")
        self._bodies()
        self._finish_problems()
        return ParsedEmail(self.out, self.attachment_data)

    def problem(self, text: str) -> None:
        self.problems.append(_clean(text))

    def _finish_problems(self) -> None:
        unique = list(dict.fromkeys(self.problems))
        if len(unique) > MAX_PROBLEMS:
            extra = len(unique) - MAX_PROBLEMS
            unique = [*unique[:MAX_PROBLEMS], f"... and {extra} more problems"]
        self.out.parse_problems.extend(unique)

    # structure

    def _parse_tree(self, raw: bytes) -> Message:
        """The message tree, parsed from input cut so that its shape stays bounded."""
        single = single_part(raw)
        if single is not None:
            return single
        bounded = self._cut(raw, _delimiter_starts(raw, self.max_parts), 2 * self.max_parts + 1,
                            f"more than {self.max_parts} MIME parts")
        try:
            return BytesParser(policy=email.policy.default).parsebytes(bounded)
        except RecursionError:
            pass
        except Exception as err:
            self.problem(f"MIME structure could not be parsed: {_describe(err)}")
            return self._headers_only(raw)
        # Too deep for the parser's recursion: read no further than max_depth levels.
        nesting = (m.start() for m in _NESTING_HEADER.finditer(bounded))
        bounded = self._cut(bounded, nesting, self.max_depth,
                            f"MIME nesting deeper than {self.max_depth} levels")
        try:
            return BytesParser(policy=email.policy.default).parsebytes(bounded)
        except Exception as err:
            self.problem(f"MIME structure could not be parsed: {_describe(err)}")
            return self._headers_only(raw)

    def _cut(self, raw: bytes, starts: Iterator[int], allowed: int, why: str) -> bytes:
        """``raw`` up to the ``allowed``-th of the line ``starts`` (offsets, ascending)."""
        for count, start in enumerate(starts, start=1):
            if count > allowed:
                self.problem(f"{why}: the rest of the message was not parsed")
                self.limit_noted = True
                return raw[:start]
        return raw

    def _headers_only(self, raw: bytes) -> Message:
        try:
            return BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        except Exception as err:
            self.problem(f"headers could not be parsed: {_describe(err)}")
            return Message(policy=email.policy.default)

    def _walk(self, part: Message, depth: int, path: str, in_alternative: bool = False
              ) -> None:
        self.parts_seen += 1
        where = f"part {path}" if path else "message"
        ctype = _content_type(part, self.problem, where)
        if not _is_container(part):
            self._leaf(part, ctype, where, in_alternative)
            return
        self._defects(part, where)
        if ctype.startswith("message/"):
            # An attached message (RFC 2046 5.2.1) is an attachment, not our body.
            data = _message_bytes(part, self.problem, where)
            self._add_attachment(part, ctype, data, _filename(part, self.problem, where),
                                 _disposition(part, self.problem, where))
            return
        if depth >= self.max_depth:
            self._note_limit(f"MIME nesting deeper than {self.max_depth} levels")
            return
        for index, child in enumerate(_children(part, self.problem, where), start=1):
            if self.parts_seen >= self.max_parts:
                self._note_limit(f"more than {self.max_parts} MIME parts")
                return
            self._walk(child, depth + 1, f"{path}.{index}" if path else str(index),
                       ctype == "multipart/alternative")

    def _note_limit(self, text: str) -> None:
        if not self.limit_noted:
            self.problem(f"{text}: the rest of the message was not parsed")
            self.limit_noted = True

    def _leaf(self, part: Message, ctype: str, where: str, in_alternative: bool) -> None:
        disposition = _disposition(part, self.problem, where)
        filename = _filename(part, self.problem, where)
        data = _decoded_payload(part, self.problem, where)
        self._defects(part, where)  # after decoding: bad base64 adds defects
        if ctype.startswith("multipart/"):
            # A multipart the parser could not split (no boundary): show it as text.
            self.problem(f"{where}: {ctype} without readable parts, shown as text")
            ctype = "text/plain"
        if ctype in ("text/plain", "text/html") and disposition != "attachment" \
                and not filename:
            if ctype == "text/plain" and self.text is None:
                self.text = _decode_text(part, data, self.problem, where)
                return
            if ctype == "text/html" and self.html is None:
                self.html = _decode_text(part, data, self.problem, where)
                return
        if ctype.startswith("text/") and not filename and (in_alternative or not data):
            # Another rendering of the body we have (RFC 2046 5.1.4), or nothing at all.
            return
        # Everything else, including further text parts, is kept as an attachment.
        self._add_attachment(part, ctype, data, filename, disposition)

    def _add_attachment(self, part: Message, ctype: str, data: bytes, filename: str,
                        disposition: str | None) -> None:
        index = len(self.attachment_data) + 1
        if not filename:
            filename = f"attachment-{index}{_extension(ctype)}"
        try:
            content_id = _strip_angles(str(part.get("content-id") or ""))
        except Exception as err:
            self.problem(f"Content-ID: {_describe(err)}")
            content_id = ""
        att = self.out.attachments.add()
        att.filename = filename[:MAX_NAME_CHARS]
        att.content_type = ctype
        att.size = len(data)
        att.content_id = _clean(content_id)[:MAX_NAME_CHARS]
        att.inline = disposition == "inline"
        self.attachment_data.append(data)

    def _defects(self, part: Message, where: str) -> None:
        try:
            defects = list(part.defects)
        except Exception:
            return
        for defect in defects:
            self.problem(f"{where}: {_describe(defect)}")

    # bodies

    def _bodies(self) -> None:
        text = self._capped(self.text, "text") if self.text else ""
        markup = self._capped(self.html, "HTML") if self.html else ""
        self.out.text = text
        self.out.html = markup
        source = text if text and not text.isspace() else html_to_text(markup)
        self.out.preview = make_preview(source)

    def _capped(self, body: str, what: str) -> str:
        encoded = body.encode("utf-8")
        if len(encoded) <= self.max_body_bytes:
            return body
        self.problem(f"{what} body longer than {self.max_body_bytes} bytes was cut")
        return encoded[: self.max_body_bytes].decode("utf-8", "ignore")

    # headers

    def _headers(self, msg: Message) -> None:
        out = self.out
        out.subject = self._subject(msg)
        out.message_id = _first_id(self._raw(msg, "message-id"))
        out.in_reply_to = _first_id(self._raw(msg, "in-reply-to"))
        refs = _MSG_ID.findall(self._raw(msg, "references"))
        if len(refs) > MAX_REFERENCES:
            self.problem(f"References: only the last {MAX_REFERENCES} ids were kept")
            refs = refs[-MAX_REFERENCES:]  # RFC 5322 3.6.4: the last ones are the closest
        out.references.extend(_clean(ref) for ref in refs)
        self._date(msg)
        froms = self._addresses(msg, "from")
        if froms:
            getattr(out, "from").CopyFrom(froms[0])  # "from" is a Python keyword
        out.to.extend(self._addresses(msg, "to"))
        out.cc.extend(self._addresses(msg, "cc"))
        out.bcc.extend(self._addresses(msg, "bcc"))
        out.reply_to.extend(self._addresses(msg, "reply-to"))

    def _raw(self, msg: Message, name: str) -> str:
        """The first raw value of header ``name`` (unfolded), or ''."""
        if self.raw_headers is None:
            self.raw_headers = {}
            try:
                for key, raw in msg.raw_items():
                    self.raw_headers.setdefault(str(key).lower(), raw)
            except Exception as err:
                self.problem(f"headers could not be read: {_describe(err)}")
        found = self.raw_headers.get(name)
        return _unfold(str(found)) if found is not None else ""

    def _header(self, msg: Message, name: str) -> object | None:
        """The structured header (policy.default) or None when it cannot be parsed."""
        try:
            value = msg.get(name)
        except Exception as err:
            self.problem(f"{_title(name)}: malformed header: {_describe(err)}")
            return None
        for defect in getattr(value, "defects", ()):
            self.problem(f"{_title(name)}: {_describe(defect)}")
        return value

    def _subject(self, msg: Message) -> str:
        raw = self._raw(msg, "subject")
        if not raw:
            return ""
        if _PLAIN_TEXT.fullmatch(raw) and "=?" not in raw:
            subject = raw  # printable ASCII, no encoded words: the parser would return it
        else:
            value = self._header(msg, "subject")
            subject = _clean(str(value)) if value is not None else _decode_words(raw)
        subject = _SPACE.sub(" ", subject).strip()
        if len(subject) > MAX_SUBJECT_CHARS:
            self.problem(f"Subject longer than {MAX_SUBJECT_CHARS} characters was cut")
            subject = subject[:MAX_SUBJECT_CHARS]
        return subject

    def _date(self, msg: Message) -> None:
        raw = self._raw(msg, "date")
        if not raw:
            self.problem("Date: missing")
            return
        when: datetime | None = None
        try:  # what the structured header does first; only a failure needs its defects
            when = email.utils.parsedate_to_datetime(raw) if raw.isascii() else None
        except (ValueError, TypeError, IndexError):
            when = None
        if when is None:
            value = self._header(msg, "date")
            when = getattr(value, "datetime", None)
        if when is None:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except Exception:
                when = None
        if when is None:
            self.problem(f"Date: unreadable: {_clean(raw)[:100]!r}")
            return
        if when.tzinfo is None:  # RFC 5322 -0000: the zone is unknown; UTC is the best guess
            when = when.replace(tzinfo=UTC)
        try:
            self.out.date.FromDatetime(when)
        except Exception as err:
            self.out.ClearField("date")
            self.problem(f"Date: out of range: {_describe(err)}")

    def _addresses(self, msg: Message, name: str) -> list[common_pb2.EmailAddress]:
        raw = self._raw(msg, name)
        if not raw.strip():
            return []
        pairs = simple_addresses(raw)  # the plain form needs no parser
        if pairs is None and len(raw) <= MAX_STRUCTURED_HEADER:
            pairs = self._structured_addresses(msg, name)
        elif pairs is None:
            self.problem(f"{_title(name)}: longer than {MAX_STRUCTURED_HEADER} bytes, "
                         "read leniently")
        if pairs is None:
            pairs = _lenient_addresses(raw)
        if len(pairs) > MAX_ADDRESSES:
            self.problem(f"{_title(name)}: only the first {MAX_ADDRESSES} addresses kept")
            pairs = pairs[:MAX_ADDRESSES]
        return [common_pb2.EmailAddress(name=_clean(n)[:MAX_NAME_CHARS],
                                        email=_clean(e)[:MAX_NAME_CHARS])
                for n, e in pairs if e or n]

    def _structured_addresses(self, msg: Message, name: str) -> list[tuple[str, str]] | None:
        value = self._header(msg, name)
        if value is None:
            return None
        try:
            # Groups (RFC 5322 3.4) are flattened: their members are the recipients.
            return [(addr.display_name, addr.addr_spec)
                    for addr in value.addresses]  # type: ignore[attr-defined]
        except Exception as err:
            self.problem(f"{_title(name)}: malformed addresses: {_describe(err)}")
            return None


class _TextExtractor(html.parser.HTMLParser):
    """Collects the text of an HTML document, skipping what is never shown."""

    _HIDDEN = frozenset({"script", "style", "head", "title", "template"})
    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5",
                         "h6", "table", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self.hidden += 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN and self.hidden:
            self.hidden -= 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.chunks.append(data)


# helpers (each one survives any input)

def _describe(err: BaseException | email.errors.MessageDefect) -> str:
    """'CloseBoundaryNotFoundDefect' → 'close boundary not found', plus any detail."""
    name = type(err).__name__
    if isinstance(err, email.errors.MessageDefect):
        words = re.sub(r"(?<!^)(?=[A-Z])", " ", name.removesuffix("Defect")).lower()
        text = str(err).strip()
        return _clean(f"{words}: {text}" if text and text != name else words)[:300]
    text = str(err).strip()
    return _clean(f"{name}: {text}" if text else name)[:300]


def _clean(text: str) -> str:
    """Text safe for protobuf (valid UTF-8): stray surrogates become their bytes or U+FFFD."""
    if text.isascii():  # O(1) in CPython, and the common case: nothing to clean
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return text.encode("utf-8", "replace").decode("utf-8", "replace")


def _unfold(value: str) -> str:
    # RFC 5322 2.2.3: unfolding removes the CRLF before folding whitespace.
    if "\n" not in value:  # most fields are one line
        return value.strip()
    return _FOLD.sub("", value).strip()


def _title(name: str) -> str:
    return "-".join(word.capitalize() for word in name.split("-")).replace("Id", "ID")


def _decode_words(raw: str) -> str:
    """RFC 2047 encoded words decoded the lenient compat32 way."""
    try:
        return _clean(str(email.header.make_header(email.header.decode_header(raw))))
    except Exception:
        return _clean(raw)


def _first_id(raw: str) -> str:
    found = _MSG_ID.search(raw)
    if found:
        return _clean(found.group(1))
    token = raw.strip().split()
    return _clean(token[0].strip("<>"))[:MAX_NAME_CHARS] if token else ""


def _strip_angles(value: str) -> str:
    return value.strip().removeprefix("<").removesuffix(">").strip()


def simple_addresses(raw: str) -> list[tuple[str, str]] | None:
    """(display name, address) pairs of a header in the plainest form, without the full
    RFC 5322 parser (a quarter of filing's CPU); None for anything else.

    The plain form: comma-separated ``local@domain``, ``<local@domain>`` or
    ``Display Name <local@domain>``,
    ASCII atoms only, single spaces, no comments, quotes, groups or encoded words. For it
    the structured parser gives exactly these pairs and no defects (a property test in
    tests/unit/test_mime.py holds the two together).
    """
    if "=?" in raw or len(raw) > MAX_STRUCTURED_HEADER:
        return None
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        match = _SIMPLE_MAILBOX.fullmatch(item.strip(" "))
        if match is None:
            return None
        name, angled, bare = match.groups()
        pairs.append((name or "", angled) if angled else ("", bare))
    return pairs


def _lenient_addresses(raw: str) -> list[tuple[str, str]]:
    try:
        pairs = _getaddresses_leniently([raw])
    except Exception:
        return []
    return [(_decode_words(name), addr) for name, addr in pairs]


def _getaddresses_leniently(values: list[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` as it was before the fix for CVE-2023-27043.

    Releases with the fix, and distributions' older releases that backport it (Debian's
    3.11.2), parse strictly by default and give ``[("", "")]`` for a whole list they
    find malformed, a trailing comma included; the old reader stays behind
    ``strict=False``. Releases without the fix have only the old reader.
    """
    try:
        return email.utils.getaddresses(values, strict=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return email.utils.getaddresses(values)


def single_part(raw: bytes) -> Message | None:
    """The parse of a plain single-part message without the line-by-line feed parser
    (a quarter of filing's CPU at 100 KB), or None when ``raw`` is anything else.

    Plain: CRLF lines, a header block of well-formed fields ended by an empty line, and a
    Content-Type that is not multipart/* or message/*. The feed parser then keeps the
    body as the payload, character for character, and finds no defect in it, and each
    field's lines go to the policy as ``_header_fields`` hands them over
    (tests/unit/test_mime.py compares the two on the whole corpus).
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0 or b"\n\n" in raw[:end + 2]:
        return None
    head = raw[:end + 2]
    if not _HEADER_BLOCK.fullmatch(head):
        return None
    policy = email.policy.default
    msg = EmailMessage(policy=policy)  # what policy.default makes its parsers build
    for lines in _header_fields(head.decode("ascii", "surrogateescape")):
        msg.set_raw(*policy.header_source_parse(lines))
    try:
        if msg.get_content_maintype() in ("multipart", "message"):
            return None
    except Exception:
        return None
    msg.set_payload(raw[end + 4:].decode("ascii", "surrogateescape"))
    return msg


def _header_fields(head: str) -> Iterator[list[str]]:
    """The lines (each with its CRLF) of each field of a header block that matches
    _HEADER_BLOCK: what the feed parser's _parse_headers hands the policy for it."""
    field: list[str] = []
    for line in head.split("\r\n")[:-1]:
        if line[0] not in " \t" and field:
            yield field
            field = []
        field.append(line + "\r\n")
    if field:
        yield field


def _delimiter_starts(raw: bytes, max_parts: int) -> Iterator[int]:
    """Offsets of the delimiter lines ("--" boundary) of the boundaries ``raw`` declares.

    Only declared boundaries count, so a long plain-text diff full of "--" lines is not
    mistaken for a structure with many parts.
    """
    boundaries: set[bytes] = set()
    # The parameter name is case-insensitive: search a lower-cased copy (same offsets)
    # with a literal-prefixed pattern, and take the value, case kept, from ``raw``.
    for match in _BOUNDARY_PARAM.finditer(raw.lower()):
        group = 1 if match.start(1) >= 0 else 2
        boundaries.add(raw[match.start(group):match.end(group)])
        if len(boundaries) > max_parts:
            break
    if not boundaries:
        return
    for match in _DASH_LINE.finditer(raw):
        token = match.group(1).rstrip()  # RFC 2046 allows trailing transport padding
        if token in boundaries or token.removesuffix(b"--") in boundaries:
            yield match.start()


def _content_type(part: Message, problem: Problem, where: str) -> str:
    try:
        ctype = part.get_content_type()
    except Exception as err:
        problem(f"{where}: Content-Type: {_describe(err)}")
        return "application/octet-stream"
    return _clean(ctype)[:200]


def _disposition(part: Message, problem: Problem, where: str) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception as err:
        problem(f"{where}: Content-Disposition: {_describe(err)}")
        return None


def _is_container(part: Message) -> bool:
    try:
        return bool(part.is_multipart())
    except Exception:
        return False


def _children(part: Message, problem: Problem, where: str) -> list[Message]:
    try:
        payload = part.get_payload()
    except Exception as err:
        problem(f"{where}: parts could not be read: {_describe(err)}")
        return []
    return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []


def _filename(part: Message, problem: Problem, where: str) -> str:
    """The filename (RFC 2183, RFC 2231 continuations and charsets), else Content-Type name."""
    try:
        name = str(part.get_filename() or "")
    except Exception as err:
        problem(f"{where}: filename: {_describe(err)}")
        return ""
    if "=?" in name:  # RFC 2047 words in a parameter: not standard, but common
        name = _decode_words(name)
    # Only the last path component: a filename must not name a directory.
    name = re.split(r"[\\/]", name)[-1]
    return "".join(ch for ch in _clean(name) if ch.isprintable()).strip()


def _decoded_payload(part: Message, problem: Problem, where: str) -> bytes:
    """The part's body with its Content-Transfer-Encoding undone (leniently)."""
    try:
        data = part.get_payload(decode=True)
    except Exception as err:
        problem(f"{where}: body could not be decoded: {_describe(err)}")
        data = None
    if isinstance(data, bytes):
        return data
    try:
        raw = part.get_payload()
    except Exception:
        return b""
    if isinstance(raw, str):
        return raw.encode("ascii", "surrogateescape")
    return b""


def _message_bytes(part: Message, problem: Problem, where: str) -> bytes:
    """An attached message as bytes (regenerated; the raw message is stored intact)."""
    buf = io.BytesIO()
    try:
        payload = part.get_payload()
        policy = email.policy.compat32.clone(linesep="\r\n")
        for sub in payload if isinstance(payload, list) else []:
            if isinstance(sub, Message):
                BytesGenerator(buf, mangle_from_=False, maxheaderlen=0,
                               policy=policy).flatten(sub)
    except Exception as err:
        problem(f"{where}: attached message could not be rebuilt: {_describe(err)}")
    return buf.getvalue()


def _charset_codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def _decode_text(part: Message, data: bytes, problem: Problem, where: str) -> str:
    """Text of a body part: its charset, else UTF-8, else with replacement characters."""
    try:
        declared = part.get_content_charset()
    except Exception:
        declared = None
    codec = _charset_codec(declared)
    if declared and codec is None:
        problem(f"{where}: unknown charset {_clean(declared)[:60]!r}, read as UTF-8")
    for candidate in (codec, "utf-8"):
        if candidate is None:
            continue
        try:
            return _clean(data.decode(candidate))
        except (UnicodeDecodeError, LookupError):
            continue
    if not declared:
        # 8-bit text without a charset (RFC 2045 says us-ascii): in practice Windows-1252.
        problem(f"{where}: 8-bit text without a charset, read as windows-1252")
        return _clean(data.decode("cp1252", "replace"))
    problem(f"{where}: text is not valid {codec or 'UTF-8'}; undecodable bytes replaced")
    return _clean(data.decode(codec or "utf-8", "replace"))


def _extension(ctype: str) -> str:
    if ctype == "message/rfc822":
        return ".eml"
    guessed = mimetypes.guess_extension(ctype, strict=False)
    if guessed:
        return guessed
    return ".txt" if ctype.startswith(("text/", "message/")) else ".bin"


def iter_attachments(parsed: ParsedEmail) -> Iterator[tuple[common_pb2.Attachment, bytes]]:
    """Each attachment with its decoded bytes."""
    yield from zip(parsed.message.attachments, parsed.attachment_data, strict=True)
