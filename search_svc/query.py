"""The search query language: Gmail's operators, parsed into a small tree.

    query    := or_expr
    or_expr  := and_expr ("OR" and_expr)*
    and_expr := unary ("AND"? unary)*          (juxtaposition means AND)
    unary    := "-" unary | atom
    atom     := "(" or_expr ")" | WORD | "PHRASE" | OP:VALUE | OP:"PHRASE" | OP:( or_expr )

Words: every word must match (case and accents do not matter); ``"an exact phrase"``;
``prefix*``. Operators (case-insensitive names): from: to: cc: bcc: subject: filename:
(text in that field; ``from:(a OR b)`` applies the field to a group), has:attachment,
is:unread|read|starred|unstarred, in:FOLDER (role or folder name; in:anywhere includes
Trash and Spam, which are otherwise left out as Gmail does), before:/after: (YYYY-MM-DD
or YYYY/MM/DD in UTC, or Unix seconds; after: includes its day, before: excludes it),
older_than:/newer_than: (Nd, Nw, Nm, Ny: days, weeks, calendar months and years),
larger:/smaller: (bytes, or with K, M, G: powers of 1024; strictly larger/smaller).
A word that is not a known operator (``re:lunch``, ``http://x``) is plain text.

The tree is backend-neutral: text stays as the user typed it and each index adapter
tokenizes it with its own analyzer (several tokens are matched as a phrase). Malformed
input raises QuerySyntaxError, whose detail ends with "at position N" (0-based, in code
points), so a client can point at the mistake.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from mailgrid.errors import InvalidArgument

# Operators that search a text field, and the field each names.
TEXT_FIELDS = ("from", "to", "cc", "bcc", "subject", "filename")
FLAGS = {"attachment", "unread", "read", "starred", "unstarred"}
ANYWHERE = "anywhere"
MAX_QUERY_LENGTH = 2000
MAX_DEPTH = 32
_OPERATORS = (*TEXT_FIELDS, "has", "is", "in", "before", "after", "older_than",
              "newer_than", "larger", "smaller")
_OPERATOR = re.compile(r"^(" + "|".join(_OPERATORS) + r"):", re.IGNORECASE)
_DURATION = re.compile(r"^(\d{1,6})([dwmy])$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d{1,15})([kmg]?)b?$", re.IGNORECASE)
_DATE = re.compile(r"^(\d{4})[-/](\d{1,2})[-/](\d{1,2})$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# Characters that end a bare word.
_WORD_END = frozenset(' \t\r\n\f\v()"')


class QuerySyntaxError(InvalidArgument):
    """A malformed query; ``position`` is the 0-based code point where it went wrong."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.message = message
        self.position = position


# ---- the tree ------------------------------------------------------------------------

@dataclass(frozen=True)
class All:
    """Matches every message (the empty query)."""


@dataclass(frozen=True)
class Text:
    """The tokens of ``text`` appear in order in ``field`` (None: any text field:
    addresses and names, subject, body, attachment filenames). With ``prefix`` the
    last token is a prefix."""

    text: str
    field: str | None = None
    prefix: bool = False
    pos: int = 0


@dataclass(frozen=True)
class Flag:
    """has:attachment (``attachment``) or is:unread/read/starred/unstarred."""

    name: str
    pos: int = 0


@dataclass(frozen=True)
class In:
    """in:NAME. The service resolves NAME into ``folder_ids`` before searching."""

    name: str
    pos: int = 0
    folder_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class DateRange:
    """lo <= date <= hi, in Unix milliseconds (None: unbounded)."""

    lo: int | None = None
    hi: int | None = None


@dataclass(frozen=True)
class SizeRange:
    """lo <= size <= hi, in bytes (None: unbounded)."""

    lo: int | None = None
    hi: int | None = None


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


Node = All | Text | Flag | In | DateRange | SizeRange | And | Or | Not


# ---- tokens --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Token:
    kind: str  # ( ) OR AND - WORD PHRASE OP OPGROUP
    value: str
    pos: int
    op: str = ""
    quoted: bool = False


def _tokens(query: str) -> Iterator[_Token]:
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            yield _Token(ch, ch, i)
            i += 1
        elif ch == '"':
            text, i = _quoted(query, i)
            yield _Token("PHRASE", text, i - len(text) - 2)
        elif ch == "-" and i + 1 < n and not query[i + 1].isspace():
            yield _Token("-", ch, i)
            i += 1
        else:
            start = i
            while i < n and query[i] not in _WORD_END:
                i += 1
            word = query[start:i]
            if word in ("OR", "AND"):
                yield _Token(word, word, start)
                continue
            match = _OPERATOR.match(word)
            if match is None:
                yield _Token("WORD", word, start)
                continue
            op, value, vpos = match.group(1).lower(), word[match.end():], start + match.end()
            if value:
                yield _Token("OP", value, vpos, op=op)
            elif i < n and query[i] == '"':
                text, i = _quoted(query, i)
                yield _Token("OP", text, vpos + 1, op=op, quoted=True)
            elif i < n and query[i] == "(":
                yield _Token("OPGROUP", "", vpos, op=op)
            else:
                raise QuerySyntaxError(f"{op}: needs a value", vpos)


def _quoted(query: str, start: int) -> tuple[str, int]:
    """The text between the quote at ``start`` and the next one; the index after it."""
    end = query.find('"', start + 1)
    if end < 0:
        raise QuerySyntaxError("unterminated quote", start)
    return query[start + 1:end], end + 1


# ---- parsing -------------------------------------------------------------------------

def parse(query: str, now: datetime | None = None) -> Node:
    """The tree of ``query``; ``now`` (default: the current time) anchors
    older_than:/newer_than:. Raises QuerySyntaxError."""
    if len(query) > MAX_QUERY_LENGTH:
        raise QuerySyntaxError(f"the query is longer than {MAX_QUERY_LENGTH} characters",
                               MAX_QUERY_LENGTH)
    parser = _Parser(list(_tokens(query)), now or datetime.now(UTC), len(query))
    node = parser.or_expr(field=None, depth=0)
    if parser.peek() is not None:
        token = parser.peek()
        assert token is not None
        raise QuerySyntaxError("unmatched ')'", token.pos)
    return node


class _Parser:
    def __init__(self, tokens: list[_Token], now: datetime, length: int) -> None:
        self.tokens = tokens
        self.index = 0
        self.now = now
        self.length = length

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def or_expr(self, field: str | None, depth: int) -> Node:
        if depth > MAX_DEPTH:
            token = self.peek()
            raise QuerySyntaxError("too deeply nested", token.pos if token else self.length)
        items = [self.and_expr(field, depth)]
        while (token := self.peek()) is not None and token.kind == "OR":
            self.take()
            items.append(self.and_expr(field, depth))
        return items[0] if len(items) == 1 else _or(items)

    def and_expr(self, field: str | None, depth: int) -> Node:
        start = self.peek()
        if start is None and not self.tokens:
            return All()  # the whole query is empty
        if start is None or start.kind in (")", "OR"):
            where = start.pos if start is not None else self.length
            what = "a term before ')'" if start is not None and start.kind == ")" else "a term"
            raise QuerySyntaxError(f"expected {what}", where)
        items: list[Node] = []
        while (token := self.peek()) is not None and token.kind not in (")", "OR"):
            if token.kind == "AND":
                self.take()
                continue
            node = self.unary(field, depth)
            if node is not None:
                items.append(node)
        return _and(items)

    def unary(self, field: str | None, depth: int) -> Node | None:
        token = self.take()
        if token.kind == "-":
            after = self.peek()
            if after is None or after.kind in (")", "OR", "AND"):
                raise QuerySyntaxError("'-' needs a term after it", token.pos)
            inner = self.unary(field, depth)
            return None if inner is None else Not(inner)
        if token.kind == "(":
            return self.group(token, field, depth)
        if token.kind == "WORD":
            return _text(token.value, field, token.pos)
        if token.kind == "PHRASE":
            return _text(token.value, field, token.pos + 1, quoted=True)
        if token.kind == "OP":
            return self.operator(token)
        if token.kind == "OPGROUP":
            if token.op not in TEXT_FIELDS:
                raise QuerySyntaxError(f"{token.op}: takes a single value", token.pos)
            return self.group(self.take(), token.op, depth)
        raise QuerySyntaxError(f"unexpected {token.value!r}", token.pos)

    def group(self, opening: _Token, field: str | None, depth: int) -> Node:
        node = self.or_expr(field, depth + 1)
        closing = self.peek()
        if closing is None or closing.kind != ")":
            raise QuerySyntaxError("'(' is never closed", opening.pos)
        self.take()
        return node

    def operator(self, token: _Token) -> Node | None:
        op, value, pos = token.op, token.value, token.pos
        if op in TEXT_FIELDS:
            return _text(value, op, pos, quoted=token.quoted)
        lowered = value.strip().lower()
        if op == "has":
            if lowered not in ("attachment", "attachments"):
                raise QuerySyntaxError(f"unknown has:{value} (expected has:attachment)", pos)
            return Flag("attachment", pos)
        if op == "is":
            if lowered not in FLAGS - {"attachment"}:
                raise QuerySyntaxError(
                    f"unknown is:{value} (expected unread, read, starred or unstarred)", pos)
            return Flag(lowered, pos)
        if op == "in":
            if not lowered:
                raise QuerySyntaxError("in: needs a folder", pos)
            return In(value.strip(), pos)
        if op in ("before", "after"):
            day = _day(value, pos)
            return DateRange(hi=day - 1) if op == "before" else DateRange(lo=day)
        if op in ("older_than", "newer_than"):
            cutoff = _ago(value, pos, self.now)
            return DateRange(hi=cutoff - 1) if op == "older_than" else DateRange(lo=cutoff)
        size = _size(value, pos)
        return SizeRange(lo=size + 1) if op == "larger" else SizeRange(hi=size - 1)


def _text(value: str, field: str | None, pos: int, quoted: bool = False) -> Text | None:
    """A Text node, or None for text with no letter or digit (nothing to match)."""
    prefix = not quoted and value.endswith("*")
    text = value.rstrip("*") if prefix else value
    if not any(ch.isalnum() for ch in text):
        return None
    return Text(text, field, prefix, pos)


def _and(items: list[Node]) -> Node:
    if not items:
        return All()
    return items[0] if len(items) == 1 else And(tuple(items))


def _or(items: list[Node]) -> Node:
    return All() if any(isinstance(i, All) for i in items) else Or(tuple(items))


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _day(value: str, pos: int) -> int:
    """Unix ms of 00:00 UTC on the day ``value`` names (or of Unix seconds ``value``)."""
    if value.isdigit() and len(value) <= 12:
        return int(value) * 1000
    match = _DATE.match(value)
    if match is None:
        raise QuerySyntaxError(f"expected a date like 2024-01-31, not {value!r}", pos)
    year, month, day = (int(part) for part in match.groups())
    try:
        return _millis(datetime(year, month, day, tzinfo=UTC))
    except ValueError:
        raise QuerySyntaxError(f"{value!r} is not a date", pos) from None


def _ago(value: str, pos: int, now: datetime) -> int:
    match = _DURATION.match(value)
    if match is None:
        raise QuerySyntaxError(f"expected an age like 7d, 2w, 3m or 1y, not {value!r}", pos)
    count, unit = int(match.group(1)), match.group(2).lower()
    try:
        if unit in "dw":
            then = now - timedelta(days=count * (7 if unit == "w" else 1))
        else:
            then = _months_before(now, count * (12 if unit == "y" else 1))
    except (OverflowError, ValueError):
        raise QuerySyntaxError(f"{value!r} reaches too far back", pos) from None
    return _millis(then)


def _months_before(now: datetime, months: int) -> datetime:
    """The same day and time ``months`` calendar months earlier (clamped to the month's
    last day: one month before March 31 is February 28 or 29)."""
    index = now.year * 12 + (now.month - 1) - months
    year, month = divmod(index, 12)
    day = min(now.day, calendar.monthrange(year, month + 1)[1])
    return now.replace(year=year, month=month + 1, day=day)


def _size(value: str, pos: int) -> int:
    match = _SIZE.match(value.strip())
    if match is None:
        raise QuerySyntaxError(f"expected a size like 500, 10K or 5M, not {value!r}", pos)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


# ---- working with trees --------------------------------------------------------------

def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents before children."""
    yield node
    if isinstance(node, And | Or):
        for item in node.items:
            yield from walk(item)
    elif isinstance(node, Not):
        yield from walk(node.item)


def mentions_folder(node: Node) -> bool:
    return any(isinstance(n, In) for n in walk(node))


def map_in(node: Node, fn: Callable[[In], Node]) -> Node:
    """The tree with each In node replaced by ``fn(node)``."""
    if isinstance(node, In):
        return fn(node)
    if isinstance(node, And):
        return And(tuple(map_in(i, fn) for i in node.items))
    if isinstance(node, Or):
        return Or(tuple(map_in(i, fn) for i in node.items))
    if isinstance(node, Not):
        return Not(map_in(node.item, fn))
    return node


def with_folders(node: In, folder_ids: tuple[str, ...]) -> In:
    return replace(node, folder_ids=folder_ids)


def required_text(node: Node) -> list[Text]:
    """The Text nodes every match must contain (those under AND only, never under OR or
    NOT): what a backend may rank and highlight by."""
    if isinstance(node, Text):
        return [node]
    if isinstance(node, And):
        return [text for item in node.items for text in required_text(item)]
    return []

