"""The SearchIndex port and the semantics every adapter must keep.

The port is a ``typing.Protocol`` whose docstrings are the contract; tests/contract/
test_search_index.py holds the suite every adapter runs (the embedded tantivy index
always, Meilisearch whenever a server is reachable).

Documents are IndexedMessage records keyed by (user_id, email_id). Changes arrive as a
batch of operations together with the EVENTS stream sequence they bring the index to;
the index records that sequence with the batch, so after a crash it says exactly which
changes it holds, and replaying events it already applied changes nothing (every
operation is idempotent).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from mailgrid.errors import InvalidArgument
from mailgrid.v1 import common_pb2
from search_svc.query import Node

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class Order(Enum):
    NEWEST = "newest"
    RELEVANCE = "relevance"


@dataclass(frozen=True)
class IndexedMessage:
    """What is searchable of one message of one mailbox.

    ``summary`` is the MessageSummary a folder listing shows (folder, flags, date, size,
    sender, subject, preview): results are returned as it. The other fields are only
    searched: address lists as "Name <addr>" strings, the text body (HTML already reduced
    to text), attachment filenames.
    """

    user_id: str
    summary: common_pb2.MessageSummary
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    body: str = ""
    filenames: tuple[str, ...] = ()

    @property
    def email_id(self) -> str:
        return self.summary.email_id


@dataclass(frozen=True)
class Upsert:
    """Index ``message``, replacing whatever the index held for its id."""

    message: IndexedMessage


@dataclass(frozen=True)
class UpdateSummary:
    """The message's folder, flags or other summary fields changed: keep its searched
    text, take the new summary. A message the index does not hold is added with the
    summary alone (searchable by sender, subject, preview, folder and flags)."""

    user_id: str
    summary: common_pb2.MessageSummary


@dataclass(frozen=True)
class Delete:
    """The message is gone for good; deleting a missing message is no error."""

    user_id: str
    email_id: str


@dataclass(frozen=True)
class DeleteUser:
    """Forget every message of the user (before rebuilding them)."""

    user_id: str


Operation = Upsert | UpdateSummary | Delete | DeleteUser


@dataclass(frozen=True)
class Highlight:
    """A matching span of a snippet, in code points: text[start:end]."""

    start: int
    end: int


@dataclass(frozen=True)
class Hit:
    summary: common_pb2.MessageSummary
    snippet: str = ""
    highlights: tuple[Highlight, ...] = ()


@dataclass(frozen=True)
class SearchPage:
    hits: list[Hit]
    # Give it back as page_token for the next page; empty on the last page.
    next_page_token: str
    # How many messages match in all (a lower bound when truncated).
    total_estimate: int
    # The backend stopped counting (or paging by relevance) at a limit.
    truncated: bool = False
    applied_seq: int = 0


@dataclass(frozen=True)
class IndexStatus:
    backend: str
    applied_seq: int
    documents: int
    extra: dict[str, str] = field(default_factory=dict)


class SearchIndex(Protocol):
    """A full-text index of every user's mail.

    - Isolation: ``search`` sees only the documents of the user it is given; no query,
      page token or operation of one user ever reads or changes another user's.
    - Ordering: ``apply`` applies its operations in order, as one batch; once it returns,
      every later ``search`` sees the whole batch (read-your-writes), and
      ``applied_seq`` returns the batch's sequence. A failed ``apply`` raises
      mailgrid.errors.Unavailable and may have applied a prefix of the batch (replaying
      it is harmless: every operation is idempotent).
    - Matching: the query tree (search_svc.query) is matched exactly as its docstrings
      say: words and phrases by tokens, case- and accent-insensitively; In nodes by
      their resolved ``folder_ids`` (an In node without ids matches nothing).
    - Order: NEWEST returns newest arrival first (by email id time); RELEVANCE best
      match first. Page tokens are opaque, valid for the same user, query and order;
      a malformed token is InvalidArgument. Paging newest-first never repeats or skips
      a message that existed when the first page was read, whatever arrives meanwhile.
    - Snippets: a short piece of the body (or the preview) around the first match, with
      the spans that matched the query's words.
    """

    backend: str

    async def apply(self, operations: Sequence[Operation], applied_seq: int) -> None:
        """Applies the operations in order, records ``applied_seq`` (never lowering it)
        and makes both visible to searches before returning."""
        ...

    async def applied_seq(self) -> int:
        """The sequence recorded by the last ``apply`` (0 for a new index)."""
        ...

    async def search(self, user_id: str, query: Node, *, order: Order = Order.NEWEST,
                     page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
                     ) -> SearchPage:
        """One page (1..100 hits) of the user's messages that match ``query``."""
        ...

    async def get(self, user_id: str, email_id: str) -> IndexedMessage | None:
        """The indexed record of a message, or None."""
        ...

    async def status(self) -> IndexStatus:
        ...

    async def close(self) -> None:
        ...


# ---- page tokens shared by the adapters ---------------------------------------------

def encode_token(kind: str, *values: int) -> str:
    raw = ":".join([kind, *map(str, values)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str, count: int = 1) -> list[int]:
    """The ``count`` numbers of a token of ``kind`` (e.g. ``k``: sort key and hits seen;
    ``o``: offset); InvalidArgument for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        found, *values = raw.split(":")
        numbers = [int(v) for v in values]
        if found != kind or len(numbers) != count or any(n < 0 for n in numbers):
            raise ValueError(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token of this query and order") from None
    return numbers


def check_page_size(page_size: int) -> int:
    size = page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 1 to {MAX_PAGE_SIZE}")
    return size


# 2020-01-01 in TIMEUUID ticks (100 ns since 1582-10-15). Keys count from there so
# that they stay below 2**53 (until 2048) and survive as doubles (Meilisearch numbers).
SORT_KEY_BASE = 0x01B21DD213814000 + 1_577_836_800 * 10_000_000


def sort_key(email_id: str) -> int:
    """The arrival time of a TIMEUUID email id in 100 ns ticks since 2020 (at least 1):
    distinct per message of a mailbox, newest largest."""
    try:
        return max(1, uuid.UUID(email_id).time - SORT_KEY_BASE)
    except ValueError:
        return 1


def date_millis(summary: common_pb2.MessageSummary) -> int:
    return summary.date.seconds * 1000 + summary.date.nanos // 1_000_000


def flag_names(summary: common_pb2.MessageSummary) -> list[str]:
    """The Flag node names a summary satisfies."""
    names = ["read" if summary.is_read else "unread",
             "starred" if summary.is_starred else "unstarred"]
    if summary.has_attachments:
        names.append("attachment")
    return names


def sender_text(summary: common_pb2.MessageSummary) -> str:
    sender = getattr(summary, "from")
    return f"{sender.name} <{sender.email}>" if sender.name else sender.email
