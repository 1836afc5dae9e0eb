"""The two storage ports of metadata_svc and the semantics every adapter must keep.

Each port is a ``typing.Protocol``; its docstrings are the contract, and
tests/contract/ holds one test suite per port that every adapter runs (the James/fsspec
pattern: an abstract test class plus one factory per adapter).

Records cross the ports as mailgrid.v1 protobuf messages (User, Folder, MessageSummary,
Message): they are already the shapes every client sees, so adapters translate rows into
them once and nothing else converts again.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailgrid.errors import MailgridError, NotFound
from mailgrid.v1 import common_pb2, metadata_pb2

# Folder roles by the names clients may use instead of a folder id (RFC 6154).
ROLE_NAMES: dict[str, common_pb2.FolderRole.ValueType] = {
    "inbox": common_pb2.FOLDER_ROLE_INBOX,
    "sent": common_pb2.FOLDER_ROLE_SENT,
    "drafts": common_pb2.FOLDER_ROLE_DRAFTS,
    "trash": common_pb2.FOLDER_ROLE_TRASH,
    "spam": common_pb2.FOLDER_ROLE_SPAM,
    "archive": common_pb2.FOLDER_ROLE_ARCHIVE,
}

# The folders every new mailbox gets, in display order.
DEFAULT_FOLDERS: tuple[tuple[str, common_pb2.FolderRole.ValueType], ...] = (
    ("Inbox", common_pb2.FOLDER_ROLE_INBOX),
    ("Sent", common_pb2.FOLDER_ROLE_SENT),
    ("Drafts", common_pb2.FOLDER_ROLE_DRAFTS),
    ("Trash", common_pb2.FOLDER_ROLE_TRASH),
    ("Spam", common_pb2.FOLDER_ROLE_SPAM),
    ("Archive", common_pb2.FOLDER_ROLE_ARCHIVE),
)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class BlobRef:
    """Where bytes were stored: their content address (sha256 hex) and their length."""

    key: str
    size: int


@dataclass(frozen=True)
class MessagePage:
    messages: list[common_pb2.MessageSummary]
    # The email id of the last message of this page; empty on the last page.
    next_page_token: str


@dataclass(frozen=True)
class StoredDelivery:
    email_id: str
    # False when this (user_id, delivery_key) had been stored before.
    created: bool


@dataclass(frozen=True)
class OutboxEvent:
    """A committed change waiting to be published on mail.events.<user_id>."""

    seq: int
    # Unique per outbox row: the Nats-Msg-Id, so a retried publish is stored once.
    event_id: str
    user_id: str
    # A serialized mailgrid.v1.MailEvent.
    payload: bytes


class BlobStore(Protocol):
    """Content-addressed, immutable bytes (raw messages, decoded attachments).

    - A blob's key is the lowercase hex sha256 of its bytes: two blobs with the same key
      have the same content, and putting the same bytes twice stores them once.
    - A put is durable when it returns (written, flushed to stable storage, renamed into
      place): a crash never leaves a partial blob under a key.
    - Putting bytes that exist already refreshes the blob's last-write time, which the
      garbage collector uses to spare blobs that an in-flight delivery just put.
    - Reading, testing or deleting a key that is not a sha256 hex behaves as for a missing
      key; reading a missing key raises mailgrid.errors.NotFound.
    - A store that cannot write (disk full, read-only, no permission) raises
      mailgrid.errors.StorageFull, whose detail starts with "storage full".
    """

    async def put(self, chunks: AsyncIterable[bytes]) -> BlobRef:
        """Stores the concatenation of ``chunks`` and returns its key and size."""
        ...

    async def put_bytes(self, data: bytes) -> BlobRef:
        """``put`` for bytes already in memory."""
        ...

    async def put_many(self, blobs: Sequence[bytes]) -> list[BlobRef]:
        """``put_bytes`` for each, durable together when it returns (a group commit where
        the store can: one sync for the batch); refs in the order given."""
        ...

    def open(self, key: str) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks of at most 1 MiB; NotFound (on first iteration)."""
        ...

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each blob's whole bytes (None for a missing key), in the order given: for
        callers that need many small blobs at once."""
        ...

    async def exists(self, key: str) -> bool:
        ...

    async def last_write(self, key: str) -> float:
        """Unix time the blob was last written or refreshed by a put; NotFound if absent."""
        ...

    async def delete(self, key: str, *, not_written_since: float | None = None) -> bool:
        """Deletes the blob; True if it was deleted.

        With ``not_written_since``, deletes only if the blob was not written or refreshed
        at or after that Unix time, atomically with respect to puts of the same bytes.
        Deleting a missing key returns False.
        """
        ...


class MetadataStore(Protocol):
    """Users, folders and messages of every mailbox, shaped by Xu's tables.

    Every operation is served by partition key plus clustering order (no joins, no
    filtering scans), so a ScyllaDB adapter implements it table for table. Each change is
    one atomic unit that also records its MailEvent(s) in the event outbox; a change is
    visible to every later read once its coroutine returns.

    Ids: users and folders have random UUID ids; email ids are TIMEUUIDs that sort by
    arrival time, and listings are newest first. Errors are mailgrid.errors: NotFound for
    an unknown user, folder or message (a message of another user and a malformed id are
    NotFound too, never a hint that they exist), InvalidArgument for bad input,
    AlreadyExists, Unauthenticated, QuotaExceeded.
    """

    # users

    async def create_user(self, address: str, password: str,
                          quota_bytes: int = 0) -> common_pb2.User:
        """Creates a user (address lower-cased) with the RFC 6154 folders Inbox, Sent,
        Drafts, Trash, Spam and Archive; the password is kept as an argon2 hash.
        AlreadyExists if the address is taken. quota_bytes 0 means unlimited."""
        ...

    async def get_user(self, user_id: str) -> common_pb2.User:
        ...

    async def get_user_by_address(self, address: str) -> common_pb2.User:
        """Looks the address up case-insensitively."""
        ...

    async def authenticate(self, address: str, password: str) -> common_pb2.User:
        """The user if the password matches; Unauthenticated with the same detail for an
        unknown address and a wrong password."""
        ...

    async def list_users(self, *, page_size: int = 0, page_token: str = ""
                         ) -> tuple[list[common_pb2.User], str]:
        """Every user, ordered by user id, with the next page token (empty on the last
        page). page_size is 1..1000, 0 meaning 100; the token is the last user id seen."""
        ...

    # reading

    async def list_folders(self, user_id: str) -> list[common_pb2.Folder]:
        """The user's folders with their total and unread counts."""
        ...

    async def get_folder(self, user_id: str, folder: str) -> common_pb2.Folder:
        """A folder by id or by role name (inbox, sent, drafts, trash, spam, archive)."""
        ...

    async def list_messages(self, user_id: str, folder: str, *, page_size: int = 0,
                            page_token: str = "", unread_only: bool = False) -> MessagePage:
        """Summaries of a folder (id or role name), newest first.

        page_size is 1..200, 0 meaning 50; page_token is the next_page_token of the
        previous page (the email id of its last message), InvalidArgument if it is not an
        email id. unread_only lists the unread messages (Xu's unread_emails table).
        """
        ...

    async def get_message(self, user_id: str, email_id: str) -> common_pb2.Message:
        """The whole message as the mailbox holds it, with its attachments."""
        ...

    # changing

    async def get_messages(self, wanted: Sequence[tuple[str, str]]
                           ) -> list[common_pb2.Message | None]:
        """``get_message`` for each (user id, email id), None where it is NotFound."""
        ...

    async def update_message(self, user_id: str, email_id: str, *,
                             is_read: bool | None = None, is_starred: bool | None = None,
                             folder: str | None = None) -> common_pb2.MessageSummary:
        """Sets flags and/or moves the message (folder by id or role) in one change;
        folder counts follow. Unset arguments are left alone; a change that changes
        nothing records no event."""
        ...

    async def delete_message(self, user_id: str, email_id: str,
                             permanent: bool = False) -> bool:
        """Moves the message to Trash and returns False; if it is in Trash already, or
        ``permanent`` is set, removes it from every table, gives its size back to the
        quota, releases its blobs and returns True."""
        ...

    async def store_delivery(self, request: metadata_pb2.StoreDeliveryRequest
                             ) -> StoredDelivery:
        """Files a message into a mailbox (folder id or role, empty meaning the inbox).

        Idempotent on (user_id, delivery_key): a repeat returns the first email id with
        created=False and changes nothing. The message joins the thread of any message it
        names in Message-ID, In-Reply-To or References (whichever arrived first), else it
        starts one; its raw and attachment blobs gain a reference. QuotaExceeded if the
        user's used_bytes plus its size would pass a non-zero quota.
        """
        ...

    async def store_deliveries(self, requests: Sequence[metadata_pb2.StoreDeliveryRequest]
                               ) -> list[StoredDelivery | MailgridError]:
        """``store_delivery`` for each, in order, as one durable unit where the store can
        (one commit for the batch). Each gets its own outcome: a delivery that fails with a
        MailgridError changes nothing and does not stop the others."""
        ...

    async def delivered_email_id(self, user_id: str, delivery_key: str) -> str | None:
        """The email id a delivery key was stored as, or None if it never was."""
        ...

    async def sender_lists(self, user_id: str) -> list[common_pb2.SenderListEntry]:
        """The user's sender allow/block entries (moves into/out of Spam add to them)."""
        ...

    async def update_sender_list(self, user_id: str, entry: common_pb2.SenderListEntry,
                                 remove: bool = False) -> list[common_pb2.SenderListEntry]:
        """Sets (or removes) one entry; InvalidArgument for an empty or bad sender."""
        ...

    # blob references (a blob is released when its last reference goes)

    async def orphaned_blobs(self, released_before: float,
                             limit: int = 1000) -> list[str]:
        """Keys of blobs that lost their last reference before that Unix time."""
        ...

    async def claim_orphan(self, blob_key: str, released_before: float) -> bool:
        """Forgets an orphan and returns True if it still has no reference and was
        released before that time (the caller then deletes the blob); an orphan that
        gained a reference again is forgotten and False is returned."""
        ...

    async def note_orphan(self, blob_key: str, since: float | None = None) -> None:
        """Records the blob as released at ``since`` (default now), unless something
        references it."""
        ...

    # event outbox (written in the same unit as each change)

    async def pending_events(self, limit: int = 100) -> list[OutboxEvent]:
        """The oldest unpublished events, in commit order."""
        ...

    async def remove_events(self, seqs: list[int]) -> None:
        """Forgets events once the bus has acknowledged them."""
        ...

    async def wait_for_events(self, timeout: float) -> None:
        """Returns when a change may have recorded events, or after ``timeout``."""
        ...

    async def close(self) -> None:
        ...


async def store_each(store: MetadataStore,
                     requests: Sequence[metadata_pb2.StoreDeliveryRequest]
                     ) -> list[StoredDelivery | MailgridError]:
    """``store_deliveries`` for a store without batches: one ``store_delivery`` each."""
    results: list[StoredDelivery | MailgridError] = []
    for request in requests:
        try:
            results.append(await store.store_delivery(request))
        except MailgridError as err:
            results.append(err)
    return results


async def get_each(store: MetadataStore, wanted: Sequence[tuple[str, str]]
                   ) -> list[common_pb2.Message | None]:
    """``get_messages`` for a store without batches: one ``get_message`` each."""
    found: list[common_pb2.Message | None] = []
    for user_id, email_id in wanted:
        try:
            found.append(await store.get_message(user_id, email_id))
        except NotFound:
            found.append(None)
    return found
