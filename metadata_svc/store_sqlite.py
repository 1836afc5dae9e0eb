"""MetadataStore on SQLite: the embedded default, one table per future ScyllaDB table.

Every query names a partition key (and a clustering range), exactly as the CQL tables
will, so this adapter does nothing a ScyllaDB adapter cannot. Writes go through ONE
connection on ONE thread (a single writer per mailbox: consistency over availability);
reads use a second connection on its own thread and see every committed change (WAL).
Each change is one transaction that also appends its MailEvent(s) to event_outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from google.protobuf.timestamp_pb2 import Timestamp

from mailgrid import ids
from mailgrid.errors import (
    AlreadyExists,
    InvalidArgument,
    MailgridError,
    NotFound,
    QuotaExceeded,
    Unauthenticated,
)
from mailgrid.v1 import common_pb2, events_pb2, metadata_pb2
from metadata_svc.blobs_fs import is_blob_key
from metadata_svc.ports import (
    DEFAULT_FOLDERS,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    ROLE_NAMES,
    MessagePage,
    OutboxEvent,
    StoredDelivery,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = sqlite3.Row

SCHEMA_VERSION = 2
# Columns added since a release, as (table, column, declaration): an existing database
# gets them with ALTER TABLE ... ADD COLUMN when it is opened (CREATE TABLE IF NOT
# EXISTS leaves an existing table as it was).
ADDED_COLUMNS = (
    ("emails_by_user", "bodies_from_raw", "INTEGER NOT NULL DEFAULT 0"),  # version 2
)
# The same answer for an unknown address and a wrong password: no account enumeration.
BAD_CREDENTIALS = "invalid address or password"

# Each table mirrors a CQL table: PRIMARY KEY ((partition), clustering...).
_SUMMARY_COLUMNS = """
    email_id TEXT NOT NULL, from_name TEXT NOT NULL, from_email TEXT NOT NULL,
    subject TEXT NOT NULL, preview TEXT NOT NULL, date REAL NOT NULL,
    is_read INTEGER NOT NULL, is_starred INTEGER NOT NULL,
    has_attachments INTEGER NOT NULL, size INTEGER NOT NULL, thread_id TEXT NOT NULL"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS users_by_address (
    address TEXT PRIMARY KEY, user_id TEXT NOT NULL, password_hash TEXT NOT NULL,
    quota_bytes INTEGER NOT NULL, created_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, address TEXT NOT NULL, quota_bytes INTEGER NOT NULL,
    used_bytes INTEGER NOT NULL, created_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS folders_by_user (
    user_id TEXT NOT NULL, folder_id TEXT NOT NULL, name TEXT NOT NULL,
    role INTEGER NOT NULL, PRIMARY KEY (user_id, folder_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS folder_counters (
    user_id TEXT NOT NULL, folder_id TEXT NOT NULL, total INTEGER NOT NULL,
    unread INTEGER NOT NULL, PRIMARY KEY (user_id, folder_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS emails_by_folder (
    user_id TEXT NOT NULL, folder_id TEXT NOT NULL, email_key BLOB NOT NULL,
    {_SUMMARY_COLUMNS},
    PRIMARY KEY (user_id, folder_id, email_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unread_emails (
    user_id TEXT NOT NULL, folder_id TEXT NOT NULL, email_key BLOB NOT NULL,
    {_SUMMARY_COLUMNS},
    PRIMARY KEY (user_id, folder_id, email_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS emails_by_user (
    user_id TEXT NOT NULL, email_id TEXT NOT NULL, folder_id TEXT NOT NULL,
    email_key BLOB NOT NULL, message_id TEXT NOT NULL, in_reply_to TEXT NOT NULL,
    references_json TEXT NOT NULL, to_json TEXT NOT NULL, cc_json TEXT NOT NULL,
    bcc_json TEXT NOT NULL, reply_to_json TEXT NOT NULL, received_at REAL NOT NULL,
    text_body TEXT NOT NULL, html_body TEXT NOT NULL, blob_key TEXT NOT NULL,
    parse_problems_json TEXT NOT NULL, delivery_key TEXT NOT NULL,
    from_name TEXT NOT NULL, from_email TEXT NOT NULL, subject TEXT NOT NULL,
    preview TEXT NOT NULL, date REAL NOT NULL, is_read INTEGER NOT NULL,
    is_starred INTEGER NOT NULL, has_attachments INTEGER NOT NULL, size INTEGER NOT NULL,
    thread_id TEXT NOT NULL, bodies_from_raw INTEGER NOT NULL,
    PRIMARY KEY (user_id, email_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attachments (
    email_id TEXT NOT NULL, attachment_id TEXT NOT NULL, position INTEGER NOT NULL,
    filename TEXT NOT NULL, content_type TEXT NOT NULL, size INTEGER NOT NULL,
    blob_key TEXT NOT NULL, content_id TEXT NOT NULL, inline INTEGER NOT NULL,
    PRIMARY KEY (email_id, attachment_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS threads (
    user_id TEXT NOT NULL, thread_id TEXT NOT NULL, email_key BLOB NOT NULL,
    email_id TEXT NOT NULL,
    PRIMARY KEY (user_id, thread_id, email_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS thread_ids_by_message_id (
    user_id TEXT NOT NULL, message_id TEXT NOT NULL, thread_id TEXT NOT NULL,
    PRIMARY KEY (user_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    user_id TEXT NOT NULL, delivery_key TEXT NOT NULL, email_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (user_id, delivery_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blob_refs (
    blob_key TEXT NOT NULL, owner TEXT NOT NULL,
    PRIMARY KEY (blob_key, owner)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blob_orphans (
    blob_key TEXT PRIMARY KEY, since REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_checks (
    user_id TEXT NOT NULL, email_id TEXT NOT NULL, verdict BLOB NOT NULL,
    PRIMARY KEY (user_id, email_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sender_lists (
    user_id TEXT NOT NULL, sender TEXT NOT NULL, allow INTEGER NOT NULL,
    source TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (user_id, sender)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,
    user_id TEXT NOT NULL, payload BLOB NOT NULL);
"""

DEFAULT_USER_PAGE = 100
MAX_USER_PAGE = 1000
_SUMMARY_NAMES = ("email_id", "from_name", "from_email", "subject", "preview", "date",
                  "is_read", "is_starred", "has_attachments", "size", "thread_id")
_ROLE_ORDER = {role: index for index, (_, role) in enumerate(DEFAULT_FOLDERS)}


class SQLiteMetadataStore:
    """The MetadataStore port on one SQLite file (see ports.MetadataStore).

    Build it with ``await SQLiteMetadataStore.open(path)``; ``close()`` when done.
    """

    def __init__(self, path: Path, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self._hasher = hasher or PasswordHasher()
        # A hash to verify against when the address is unknown, so both failures cost
        # the same time.
        self._dummy_hash = ""
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def open(cls, path: Path, hasher: PasswordHasher | None = None
                   ) -> SQLiteMetadataStore:
        """Opens (creating file, directory and schema if needed) the store at ``path``."""
        store = cls(path, hasher)
        await store._open()
        return store

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._wconn = await loop.run_in_executor(self._writer, self._connect_writer)
        self._rconn = await loop.run_in_executor(self._reader, self._connect_reader)
        self._dummy_hash = await asyncio.to_thread(self._hasher.hash, "not a password")
        log.info("metadata store at %s", self.path)

    def _connect_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        for table, column, declaration in ADDED_COLUMNS:
            have = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
            self._wconn = None
        if self._rconn is not None:
            await loop.run_in_executor(self._reader, self._rconn.close)
            self._rconn = None
        self._writer.shutdown()
        self._reader.shutdown()

    # running transactions on their threads

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._wconn is None:
            raise RuntimeError("metadata store is closed")
        loop = asyncio.get_running_loop()
        # Runs to completion on the writer thread even if the caller is cancelled, so a
        # transaction is never left half done.
        result = await loop.run_in_executor(
            self._writer, _in_transaction, self._wconn, "BEGIN IMMEDIATE", fn)
        self._changed.set()
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._rconn is None:
            raise RuntimeError("metadata store is closed")
        loop = asyncio.get_running_loop()
        # One read transaction: every statement of ``fn`` sees the same snapshot.
        return await loop.run_in_executor(self._reader, _in_transaction, self._rconn,
                                          "BEGIN", fn)

    # users

    async def create_user(self, address: str, password: str,
                          quota_bytes: int = 0) -> common_pb2.User:
        address = _normalize_address(address)
        if not password:
            raise InvalidArgument("a password is required")
        if quota_bytes < 0:
            raise InvalidArgument("quota_bytes must not be negative")
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        return await self._write(functools.partial(
            _create_user, address=address, password_hash=password_hash,
            quota_bytes=quota_bytes))

    async def get_user(self, user_id: str) -> common_pb2.User:
        return await self._read(functools.partial(_user, user_id=user_id))

    async def get_user_by_address(self, address: str) -> common_pb2.User:
        def read(conn: sqlite3.Connection) -> common_pb2.User:
            row = _one(conn, "SELECT user_id FROM users_by_address WHERE address = ?",
                       address.strip().lower())
            if row is None:
                raise NotFound(f"no user {address!r}")
            return _user(conn, row["user_id"])

        return await self._read(read)

    async def authenticate(self, address: str, password: str) -> common_pb2.User:
        def read(conn: sqlite3.Connection) -> Row | None:
            return _one(conn, "SELECT user_id, password_hash FROM users_by_address "
                        "WHERE address = ?", address.strip().lower())

        row = await self._read(read)
        stored = row["password_hash"] if row is not None else self._dummy_hash
        if not await asyncio.to_thread(self._verify, stored, password) or row is None:
            raise Unauthenticated(BAD_CREDENTIALS)
        return await self.get_user(row["user_id"])

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    async def list_users(self, *, page_size: int = 0, page_token: str = ""
                         ) -> tuple[list[common_pb2.User], str]:
        size = page_size or DEFAULT_USER_PAGE
        if not 1 <= size <= MAX_USER_PAGE:
            raise InvalidArgument(f"page_size must be 1 to {MAX_USER_PAGE}")

        def read(conn: sqlite3.Connection) -> tuple[list[common_pb2.User], str]:
            # A token-range scan of the users partition keys, as Scylla pages them.
            rows = conn.execute("SELECT user_id FROM users WHERE user_id > ? "
                                "ORDER BY user_id LIMIT ?", (page_token, size)).fetchall()
            users = [_user(conn, row["user_id"]) for row in rows]
            return users, users[-1].user_id if len(users) == size else ""

        return await self._read(read)

    # reading

    async def list_folders(self, user_id: str) -> list[common_pb2.Folder]:
        return await self._read(functools.partial(_folders, user_id=user_id))

    async def get_folder(self, user_id: str, folder: str) -> common_pb2.Folder:
        return await self._read(functools.partial(_resolve_folder, user_id=user_id,
                                                  folder=folder))

    async def list_messages(self, user_id: str, folder: str, *, page_size: int = 0,
                            page_token: str = "", unread_only: bool = False) -> MessagePage:
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}")
        after: bytes | None = None
        if page_token:
            try:
                after = ids.time_sort_key(ids.parse_timeuuid(page_token))
            except ValueError:
                raise InvalidArgument(f"bad page_token {page_token!r}") from None
        table = "unread_emails" if unread_only else "emails_by_folder"

        def read(conn: sqlite3.Connection) -> MessagePage:
            folder_id = _resolve_folder(conn, user_id, folder).folder_id
            sql = (f"SELECT folder_id, {', '.join(_SUMMARY_NAMES)} FROM {table} "
                   "WHERE user_id = ? AND folder_id = ?")
            args: list[Any] = [user_id, folder_id]
            if after is not None:
                sql += " AND email_key < ?"
                args.append(after)
            sql += " ORDER BY email_key DESC LIMIT ?"
            args.append(size + 1)
            rows = conn.execute(sql, args).fetchall()
            summaries = [_summary(row) for row in rows[:size]]
            token = summaries[-1].email_id if len(rows) > size else ""
            return MessagePage(summaries, token)

        return await self._read(read)

    async def get_message(self, user_id: str, email_id: str) -> common_pb2.Message:
        _parse_email_id(email_id)
        return await self._read(functools.partial(_message, user_id=user_id,
                                                  email_id=email_id))

    async def get_messages(self, wanted: Sequence[tuple[str, str]]
                           ) -> list[common_pb2.Message | None]:
        def read(conn: sqlite3.Connection) -> list[common_pb2.Message | None]:
            found: list[common_pb2.Message | None] = []
            for user_id, email_id in wanted:
                try:
                    _parse_email_id(email_id)
                    found.append(_message(conn, user_id=user_id, email_id=email_id))
                except NotFound:
                    found.append(None)
            return found

        return await self._read(read)

    # changing

    async def update_message(self, user_id: str, email_id: str, *,
                             is_read: bool | None = None, is_starred: bool | None = None,
                             folder: str | None = None) -> common_pb2.MessageSummary:
        _parse_email_id(email_id)
        if folder is not None and not folder:
            raise InvalidArgument("folder_id must not be empty when moving")

        def write(conn: sqlite3.Connection) -> common_pb2.MessageSummary:
            row = _email_row(conn, user_id, email_id)
            target = (row["folder_id"] if folder is None
                      else _resolve_folder(conn, user_id, folder).folder_id)
            read = bool(row["is_read"]) if is_read is None else is_read
            starred = bool(row["is_starred"]) if is_starred is None else is_starred
            summary = _change(conn, row, target, read, starred)
            moved = target != row["folder_id"]
            if moved:
                _spam_feedback(conn, row, target)
            if summary is None:
                return _summary(row)
            event = events_pb2.MailEvent(user_id=user_id)
            event.message_updated.message.CopyFrom(summary)
            if moved:
                event.message_updated.previous_folder_id = row["folder_id"]
            if moved or read != bool(row["is_read"]):
                _add_folders(conn, event, user_id, {row["folder_id"], target})
            _emit(conn, event)
            return summary

        return await self._write(write)

    async def delete_message(self, user_id: str, email_id: str,
                             permanent: bool = False) -> bool:
        _parse_email_id(email_id)

        def write(conn: sqlite3.Connection) -> bool:
            row = _email_row(conn, user_id, email_id)
            trash = _resolve_folder(conn, user_id, "trash").folder_id
            event = events_pb2.MailEvent(user_id=user_id)
            deleted = event.message_deleted
            deleted.email_id, deleted.folder_id = email_id, row["folder_id"]
            if permanent or row["folder_id"] == trash:
                _remove(conn, row)
                deleted.permanent = True
                _add_folders(conn, event, user_id, {row["folder_id"]})
            else:
                _change(conn, row, trash, bool(row["is_read"]), bool(row["is_starred"]))
                _add_folders(conn, event, user_id, {row["folder_id"], trash})
            _emit(conn, event)
            return deleted.permanent

        return await self._write(write)

    async def store_delivery(self, request: metadata_pb2.StoreDeliveryRequest
                             ) -> StoredDelivery:
        _check_delivery(request)
        return await self._write(functools.partial(_store_delivery, request=request, folders={}))

    async def store_deliveries(self, requests: Sequence[metadata_pb2.StoreDeliveryRequest]
                               ) -> list[StoredDelivery | MailgridError]:
        results: list[StoredDelivery | MailgridError | None] = []
        valid: list[tuple[int, metadata_pb2.StoreDeliveryRequest]] = []
        for request in requests:
            try:
                _check_delivery(request)
            except MailgridError as err:
                results.append(err)
            else:
                valid.append((len(results), request))
                results.append(None)

        def write(conn: sqlite3.Connection) -> None:
            # One transaction, one commit (one fsync) for the batch; a savepoint per
            # delivery so that one refused (e.g. over quota) leaves the others filed.
            folders: dict[str, list[common_pb2.Folder]] = {}
            for index, request in valid:
                conn.execute("SAVEPOINT delivery")
                try:
                    results[index] = _store_delivery(conn, request=request, folders=folders)
                except MailgridError as err:
                    conn.execute("ROLLBACK TO delivery")
                    results[index] = err
                conn.execute("RELEASE delivery")

        if valid:
            await self._write(write)
        return [result for result in results if result is not None]

    async def sender_lists(self, user_id: str) -> list[common_pb2.SenderListEntry]:
        def read(conn: sqlite3.Connection) -> list[common_pb2.SenderListEntry]:
            _user(conn, user_id)
            return _sender_lists(conn, user_id)

        return await self._read(read)

    async def update_sender_list(self, user_id: str, entry: common_pb2.SenderListEntry,
                                 remove: bool = False) -> list[common_pb2.SenderListEntry]:
        sender = entry.sender.strip().lower()
        if not sender or " " in sender or sender.startswith("@") or sender.endswith("@"):
            raise InvalidArgument(f"sender {entry.sender!r}: expected an address or a domain")

        def write(conn: sqlite3.Connection) -> list[common_pb2.SenderListEntry]:
            _user(conn, user_id)
            if remove:
                conn.execute("DELETE FROM sender_lists WHERE user_id = ? AND sender = ?",
                             (user_id, sender))
            else:
                _put_sender(conn, user_id, entry)
            return _sender_lists(conn, user_id)

        return await self._write(write)

    async def delivered_email_id(self, user_id: str, delivery_key: str) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            row = _one(conn, "SELECT email_id FROM deliveries WHERE user_id = ? AND "
                       "delivery_key = ?", user_id, delivery_key)
            return None if row is None else str(row["email_id"])

        return await self._read(read)

    # blob references

    async def orphaned_blobs(self, released_before: float,
                             limit: int = 1000) -> list[str]:
        # A sweep of a small table; on ScyllaDB a token-range scan by the one sweeper.
        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT blob_key FROM blob_orphans WHERE since < ? LIMIT ?",
                                (released_before, limit)).fetchall()
            return [row["blob_key"] for row in rows]

        return await self._read(read)

    async def claim_orphan(self, blob_key: str, released_before: float) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            row = _one(conn, "SELECT since FROM blob_orphans WHERE blob_key = ?", blob_key)
            if row is None:
                return False
            if _has_refs(conn, blob_key):
                conn.execute("DELETE FROM blob_orphans WHERE blob_key = ?", (blob_key,))
                return False
            if row["since"] >= released_before:
                return False
            conn.execute("DELETE FROM blob_orphans WHERE blob_key = ?", (blob_key,))
            return True

        return await self._write(write)

    async def note_orphan(self, blob_key: str, since: float | None = None) -> None:
        at = time.time() if since is None else since

        def write(conn: sqlite3.Connection) -> None:
            if not _has_refs(conn, blob_key):
                conn.execute("INSERT OR REPLACE INTO blob_orphans (blob_key, since) "
                             "VALUES (?, ?)", (blob_key, at))

        await self._write(write)

    # event outbox

    async def pending_events(self, limit: int = 100) -> list[OutboxEvent]:
        def read(conn: sqlite3.Connection) -> list[OutboxEvent]:
            rows = conn.execute("SELECT seq, event_id, user_id, payload FROM event_outbox "
                                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
            return [OutboxEvent(r["seq"], r["event_id"], r["user_id"], bytes(r["payload"]))
                    for r in rows]

        return await self._read(read)

    async def remove_events(self, seqs: list[int]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM event_outbox WHERE seq = ?", [(s,) for s in seqs])

        if not seqs or self._wconn is None:
            return
        loop = asyncio.get_running_loop()
        # Forgetting published events need not survive a power cut: a row that comes back
        # is published again and JetStream drops the repeat by its Nats-Msg-Id. So this
        # commit skips the WAL fsync (synchronous=NORMAL); the next FULL commit covers it.
        await loop.run_in_executor(self._writer, _in_transaction, self._wconn,
                                   "BEGIN IMMEDIATE", write, "NORMAL")

    async def wait_for_events(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with the event being set, leaving the waiting task impossible to stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()


# --- connection helpers ---------------------------------------------------------------

def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per change.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # A job is acknowledged after our commit, so the commit must survive a power cut.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    # A batch files each copy under its own savepoint, and a savepoint keeps the pages
    # it changes in a sub-journal. On disk (the default) that journal was a temp file in
    # /var/tmp written at about 35 pwrite calls per copy; in memory it costs a few
    # page copies, at most the pages one batch touches.
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def _in_transaction(conn: sqlite3.Connection, begin: str,
                    fn: Callable[[sqlite3.Connection], T], synchronous: str = "") -> T:
    if synchronous:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    try:
        conn.execute(begin)
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if synchronous:
            conn.execute("PRAGMA synchronous=FULL")
    return result


def _one(conn: sqlite3.Connection, sql: str, *args: Any) -> Row | None:
    row: Row | None = conn.execute(sql, args).fetchone()
    return row


# --- conversions -----------------------------------------------------------------------

def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1_000_000_000))
    return stamp


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1_000_000_000


def _addresses_json(addresses: Iterable[common_pb2.EmailAddress]) -> str:
    return json.dumps([[a.name, a.email] for a in addresses])


def _addresses(text: str) -> list[common_pb2.EmailAddress]:
    return [common_pb2.EmailAddress(name=name, email=email) for name, email in json.loads(text)]


def _summary(row: Row | dict[str, Any]) -> common_pb2.MessageSummary:
    summary = common_pb2.MessageSummary(
        email_id=row["email_id"], folder_id=row["folder_id"], subject=row["subject"],
        preview=row["preview"], date=_timestamp(row["date"]), is_read=bool(row["is_read"]),
        is_starred=bool(row["is_starred"]), has_attachments=bool(row["has_attachments"]),
        size=row["size"], thread_id=row["thread_id"])
    sender = getattr(summary, "from")
    sender.name, sender.email = row["from_name"], row["from_email"]
    return summary


def _user(conn: sqlite3.Connection, user_id: str) -> common_pb2.User:
    row = _one(conn, "SELECT * FROM users WHERE user_id = ?", user_id)
    if row is None:
        raise NotFound(f"no user {user_id!r}")
    return common_pb2.User(user_id=row["user_id"], address=row["address"],
                           quota_bytes=row["quota_bytes"], used_bytes=row["used_bytes"],
                           created_at=_timestamp(row["created_at"]))


def _normalize_address(address: str) -> str:
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in address):
        raise InvalidArgument(f"not an email address: {address!r}")
    return address


def _parse_email_id(email_id: str) -> uuid.UUID:
    """The id as a TIMEUUID; a malformed id is simply a message that does not exist."""
    try:
        return ids.parse_timeuuid(email_id)
    except ValueError:
        raise NotFound(f"no message {email_id!r}") from None


# --- users and folders -----------------------------------------------------------------

def _create_user(conn: sqlite3.Connection, *, address: str, password_hash: str,
                 quota_bytes: int) -> common_pb2.User:
    # On ScyllaDB: INSERT ... IF NOT EXISTS (a lightweight transaction) on the address.
    if _one(conn, "SELECT 1 FROM users_by_address WHERE address = ?", address):
        raise AlreadyExists(f"address {address} is taken")
    user_id, now = ids.new_id(), time.time()
    conn.execute("INSERT INTO users_by_address VALUES (?, ?, ?, ?, ?)",
                 (address, user_id, password_hash, quota_bytes, now))
    conn.execute("INSERT INTO users VALUES (?, ?, ?, 0, ?)",
                 (user_id, address, quota_bytes, now))
    for name, role in DEFAULT_FOLDERS:
        folder_id = ids.new_id()
        conn.execute("INSERT INTO folders_by_user VALUES (?, ?, ?, ?)",
                     (user_id, folder_id, name, role))
        conn.execute("INSERT INTO folder_counters VALUES (?, ?, 0, 0)", (user_id, folder_id))
    return _user(conn, user_id)


def _folders(conn: sqlite3.Connection, user_id: str) -> list[common_pb2.Folder]:
    rows = conn.execute("SELECT folder_id, name, role FROM folders_by_user WHERE user_id = ?",
                        (user_id,)).fetchall()
    if not rows:  # every user has folders: none means no such user
        raise NotFound(f"no user {user_id!r}")
    counts = {r["folder_id"]: (r["total"], r["unread"]) for r in conn.execute(
        "SELECT folder_id, total, unread FROM folder_counters WHERE user_id = ?", (user_id,))}
    folders = [common_pb2.Folder(folder_id=r["folder_id"], name=r["name"], role=r["role"],
                                 total=counts.get(r["folder_id"], (0, 0))[0],
                                 unread=counts.get(r["folder_id"], (0, 0))[1])
               for r in rows]
    folders.sort(key=lambda f: (_ROLE_ORDER.get(f.role, len(_ROLE_ORDER)), f.name))
    return folders


def _resolve_folder(conn: sqlite3.Connection, user_id: str, folder: str,
                    known: list[common_pb2.Folder] | None = None) -> common_pb2.Folder:
    """The folder named by id or role, among ``known`` (the user's folders as read
    earlier in this transaction) or the user's folders read now."""
    if not folder:
        raise InvalidArgument("folder_id is required")
    role = ROLE_NAMES.get(folder.lower())
    for candidate in _folders(conn, user_id) if known is None else known:
        if candidate.folder_id == folder or (role is not None and candidate.role == role):
            return candidate
    raise NotFound(f"no folder {folder!r}")


def _add_folders(conn: sqlite3.Connection, event: events_pb2.MailEvent, user_id: str,
                 folder_ids: set[str]) -> None:
    event.folders.extend(f for f in _folders(conn, user_id) if f.folder_id in folder_ids)


def _with_counts(conn: sqlite3.Connection, user_id: str,
                 folder: common_pb2.Folder) -> common_pb2.Folder:
    """``folder`` with its counters as they are now in this transaction."""
    row = _one(conn, "SELECT total, unread FROM folder_counters WHERE user_id = ? AND "
               "folder_id = ?", user_id, folder.folder_id)
    return common_pb2.Folder(folder_id=folder.folder_id, name=folder.name, role=folder.role,
                             total=row["total"] if row else 0,
                             unread=row["unread"] if row else 0)


def _count(conn: sqlite3.Connection, user_id: str, folder_id: str, total: int,
           unread: int) -> None:
    conn.execute("UPDATE folder_counters SET total = total + ?, unread = unread + ? "
                 "WHERE user_id = ? AND folder_id = ?", (total, unread, user_id, folder_id))


# --- messages --------------------------------------------------------------------------

def _email_row(conn: sqlite3.Connection, user_id: str, email_id: str) -> Row:
    row = _one(conn, "SELECT * FROM emails_by_user WHERE user_id = ? AND email_id = ?",
               user_id, email_id)
    if row is None:
        raise NotFound(f"no message {email_id!r}")
    return row


def _message(conn: sqlite3.Connection, user_id: str, email_id: str) -> common_pb2.Message:
    row = _email_row(conn, user_id, email_id)
    message = common_pb2.Message(
        email_id=row["email_id"], folder_id=row["folder_id"], thread_id=row["thread_id"],
        message_id=row["message_id"], to=_addresses(row["to_json"]),
        cc=_addresses(row["cc_json"]), bcc=_addresses(row["bcc_json"]),
        reply_to=_addresses(row["reply_to_json"]), subject=row["subject"],
        date=_timestamp(row["date"]), received_at=_timestamp(row["received_at"]),
        text=row["text_body"], html=row["html_body"], preview=row["preview"],
        attachments=_attachments(conn, email_id), is_read=bool(row["is_read"]),
        is_starred=bool(row["is_starred"]), size=row["size"], blob_key=row["blob_key"],
        in_reply_to=row["in_reply_to"], references=json.loads(row["references_json"]),
        parse_problems=json.loads(row["parse_problems_json"]),
        bodies_from_raw=bool(row["bodies_from_raw"]))
    sender = getattr(message, "from")
    sender.name, sender.email = row["from_name"], row["from_email"]
    checks = _one(conn, "SELECT verdict FROM message_checks WHERE user_id = ? AND "
                  "email_id = ?", user_id, email_id)
    if checks is not None:
        message.checks.ParseFromString(checks["verdict"])
    return message


def _spam_feedback(conn: sqlite3.Connection, row: Row, target: str) -> None:
    """A move into Spam blocks the sender, a move out of it (but not to Trash) allows
    the sender: the user's verdict, fed to the inbound spam rules."""
    roles = {f.folder_id: f.role for f in _folders(conn, row["user_id"])}
    into = roles.get(target) == common_pb2.FOLDER_ROLE_SPAM
    out_of = (roles.get(row["folder_id"]) == common_pb2.FOLDER_ROLE_SPAM
              and roles.get(target) != common_pb2.FOLDER_ROLE_TRASH)
    sender = str(row["from_email"]).strip().lower()
    if (into or out_of) and "@" in sender:
        _put_sender(conn, row["user_id"], common_pb2.SenderListEntry(
            sender=sender, allow=out_of, source="feedback"))


def _put_sender(conn: sqlite3.Connection, user_id: str,
                entry: common_pb2.SenderListEntry) -> None:
    conn.execute("INSERT OR REPLACE INTO sender_lists VALUES (?, ?, ?, ?, ?)",
                 (user_id, entry.sender.strip().lower(), int(entry.allow),
                  entry.source or "user", time.time()))


def _sender_lists(conn: sqlite3.Connection, user_id: str
                  ) -> list[common_pb2.SenderListEntry]:
    rows = conn.execute("SELECT sender, allow, source FROM sender_lists WHERE user_id = ? "
                        "ORDER BY sender", (user_id,)).fetchall()
    return [common_pb2.SenderListEntry(sender=r["sender"], allow=bool(r["allow"]),
                                       source=r["source"]) for r in rows]


def _attachments(conn: sqlite3.Connection, email_id: str) -> list[common_pb2.Attachment]:
    rows = conn.execute("SELECT * FROM attachments WHERE email_id = ?", (email_id,)).fetchall()
    rows.sort(key=lambda r: r["position"])
    return [common_pb2.Attachment(
        attachment_id=r["attachment_id"], filename=r["filename"],
        content_type=r["content_type"], size=r["size"], blob_key=r["blob_key"],
        content_id=r["content_id"], inline=bool(r["inline"])) for r in rows]


def _insert_listing(conn: sqlite3.Connection, table: str, row: Row | dict[str, Any],
                    folder_id: str, is_read: bool, is_starred: bool) -> None:
    values = {name: row[name] for name in _SUMMARY_NAMES}
    values.update(is_read=int(is_read), is_starred=int(is_starred))
    columns = ("user_id", "folder_id", "email_key", *_SUMMARY_NAMES)
    conn.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        (row["user_id"], folder_id, row["email_key"], *values.values()))


def _delete_listing(conn: sqlite3.Connection, table: str, row: Row) -> None:
    conn.execute(f"DELETE FROM {table} WHERE user_id = ? AND folder_id = ? AND email_key = ?",
                 (row["user_id"], row["folder_id"], row["email_key"]))


def _change(conn: sqlite3.Connection, row: Row, folder_id: str, is_read: bool,
            is_starred: bool) -> common_pb2.MessageSummary | None:
    """Moves and/or re-flags a message in every table; None if nothing changes."""
    was_read = bool(row["is_read"])
    if (folder_id, is_read, is_starred) == (row["folder_id"], was_read,
                                            bool(row["is_starred"])):
        return None
    user_id = row["user_id"]
    # The listing rows are keyed by folder, so a change rewrites them (Xu: "marking read
    # moves the row" between emails_by_folder and unread_emails).
    _delete_listing(conn, "emails_by_folder", row)
    if not was_read:
        _delete_listing(conn, "unread_emails", row)
    _insert_listing(conn, "emails_by_folder", row, folder_id, is_read, is_starred)
    if not is_read:
        _insert_listing(conn, "unread_emails", row, folder_id, is_read, is_starred)
    conn.execute("UPDATE emails_by_user SET folder_id = ?, is_read = ?, is_starred = ? "
                 "WHERE user_id = ? AND email_id = ?",
                 (folder_id, int(is_read), int(is_starred), user_id, row["email_id"]))
    _count(conn, user_id, row["folder_id"], -1, -int(not was_read))
    _count(conn, user_id, folder_id, 1, int(not is_read))
    return _summary(_email_row(conn, user_id, row["email_id"]))


def _remove(conn: sqlite3.Connection, row: Row) -> None:
    """Deletes a message from every table and releases its blobs."""
    user_id, email_id = row["user_id"], row["email_id"]
    _delete_listing(conn, "emails_by_folder", row)
    if not row["is_read"]:
        _delete_listing(conn, "unread_emails", row)
    owners = [(row["blob_key"], f"{email_id}/raw")]
    owners += [(a.blob_key, f"{email_id}/attachment/{a.attachment_id}")
               for a in _attachments(conn, email_id)]
    conn.execute("DELETE FROM attachments WHERE email_id = ?", (email_id,))
    conn.execute("DELETE FROM threads WHERE user_id = ? AND thread_id = ? AND email_key = ?",
                 (user_id, row["thread_id"], row["email_key"]))
    conn.execute("DELETE FROM emails_by_user WHERE user_id = ? AND email_id = ?",
                 (user_id, email_id))
    conn.execute("DELETE FROM message_checks WHERE user_id = ? AND email_id = ?",
                 (user_id, email_id))
    # The deliveries row stays: a redelivered job must not bring deleted mail back.
    _count(conn, user_id, row["folder_id"], -1, -int(not row["is_read"]))
    conn.execute("UPDATE users SET used_bytes = MAX(0, used_bytes - ?) WHERE user_id = ?",
                 (row["size"], user_id))
    _release(conn, owners)


def _release(conn: sqlite3.Connection, owners: Sequence[tuple[str, str]]) -> None:
    now = time.time()
    for blob_key, owner in owners:
        conn.execute("DELETE FROM blob_refs WHERE blob_key = ? AND owner = ?",
                     (blob_key, owner))
    for blob_key in {key for key, _ in owners}:
        if not _has_refs(conn, blob_key):
            conn.execute("INSERT OR REPLACE INTO blob_orphans (blob_key, since) "
                         "VALUES (?, ?)", (blob_key, now))


def _has_refs(conn: sqlite3.Connection, blob_key: str) -> bool:
    return _one(conn, "SELECT 1 FROM blob_refs WHERE blob_key = ? LIMIT 1",
                blob_key) is not None


def _emit(conn: sqlite3.Connection, event: events_pb2.MailEvent) -> None:
    event.time.CopyFrom(_timestamp(time.time()))
    conn.execute("INSERT INTO event_outbox (event_id, user_id, payload) VALUES (?, ?, ?)",
                 (ids.new_id(), event.user_id, event.SerializeToString()))


# --- delivery --------------------------------------------------------------------------

def _check_delivery(request: metadata_pb2.StoreDeliveryRequest) -> None:
    if not request.user_id:
        raise InvalidArgument("user_id is required")
    if not request.delivery_key:
        raise InvalidArgument("delivery_key is required")
    if not is_blob_key(request.blob_key):
        raise InvalidArgument(f"blob_key is not a sha256 hex: {request.blob_key!r}")
    if request.size < 0:
        raise InvalidArgument("size must not be negative")
    for attachment in request.parsed.attachments:
        if not is_blob_key(attachment.blob_key):
            raise InvalidArgument(f"attachment {attachment.filename!r} has a bad blob_key")


def _clean_message_id(value: str) -> str:
    return value.strip().strip("<>").strip()


def _thread_for(conn: sqlite3.Connection, user_id: str, linked: list[str],
                email_id: str) -> str:
    """The thread of the first linked Message-ID already known, else a new one.

    Every linked id is registered, so a parent arriving after its reply joins the
    reply's thread (RFC 5322 3.6.4: In-Reply-To and References name the parents).
    """
    thread_id = email_id
    for message_id in linked:
        row = _one(conn, "SELECT thread_id FROM thread_ids_by_message_id "
                   "WHERE user_id = ? AND message_id = ?", user_id, message_id)
        if row is not None:
            thread_id = row["thread_id"]
            break
    for message_id in linked:
        conn.execute("INSERT OR IGNORE INTO thread_ids_by_message_id VALUES (?, ?, ?)",
                     (user_id, message_id, thread_id))
    return thread_id


def _store_delivery(conn: sqlite3.Connection, *,
                    request: metadata_pb2.StoreDeliveryRequest,
                    folders: dict[str, list[common_pb2.Folder]]) -> StoredDelivery:
    """Files one copy. ``folders`` holds the folders of users read earlier in the same
    write transaction (nothing else changes them meanwhile), so a batch reads each
    user's folders once."""
    user_id = request.user_id
    seen = _one(conn, "SELECT email_id FROM deliveries WHERE user_id = ? AND delivery_key = ?",
                user_id, request.delivery_key)
    if seen is not None:
        return StoredDelivery(seen["email_id"], created=False)
    user = _user(conn, user_id)
    if user.quota_bytes and user.used_bytes + request.size > user.quota_bytes:
        raise QuotaExceeded(f"mailbox {user.address} is full")
    if user_id not in folders:
        folders[user_id] = _folders(conn, user_id)
    folder = _resolve_folder(conn, user_id, request.folder_id or "inbox", folders[user_id])
    folder_id = folder.folder_id
    parsed = request.parsed
    email_uuid = ids.new_timeuuid()
    email_id = str(email_uuid)
    linked = [m for m in (_clean_message_id(x) for x in
                          (parsed.message_id, parsed.in_reply_to, *parsed.references)) if m]
    thread_id = _thread_for(conn, user_id, list(dict.fromkeys(linked)), email_id)
    received = (_seconds(request.received_at) if request.HasField("received_at")
                else time.time())
    sender = getattr(parsed, "from")
    row: dict[str, Any] = {
        "user_id": user_id, "email_id": email_id, "folder_id": folder_id,
        "email_key": ids.time_sort_key(email_uuid),
        "message_id": _clean_message_id(parsed.message_id),
        "in_reply_to": _clean_message_id(parsed.in_reply_to),
        "references_json": json.dumps([_clean_message_id(r) for r in parsed.references]),
        "to_json": _addresses_json(parsed.to), "cc_json": _addresses_json(parsed.cc),
        "bcc_json": _addresses_json(parsed.bcc),
        "reply_to_json": _addresses_json(parsed.reply_to), "received_at": received,
        "text_body": parsed.text, "html_body": parsed.html, "blob_key": request.blob_key,
        "parse_problems_json": json.dumps(list(parsed.parse_problems)),
        "delivery_key": request.delivery_key, "from_name": sender.name,
        "from_email": sender.email, "subject": parsed.subject, "preview": parsed.preview,
        "date": _seconds(parsed.date) if parsed.HasField("date") else received,
        "is_read": int(request.is_read), "is_starred": 0,
        "has_attachments": int(bool(parsed.attachments)), "size": request.size,
        "thread_id": thread_id, "bodies_from_raw": int(parsed.bodies_from_raw),
    }
    conn.execute(f"INSERT INTO emails_by_user ({', '.join(row)}) "
                 f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    _insert_listing(conn, "emails_by_folder", row, folder_id, request.is_read, False)
    if not request.is_read:
        _insert_listing(conn, "unread_emails", row, folder_id, False, False)
    owners = [(request.blob_key, f"{email_id}/raw")]
    owners += _store_attachments(conn, email_id, parsed.attachments)
    for blob_key, owner in owners:
        conn.execute("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)", (blob_key, owner))
        conn.execute("DELETE FROM blob_orphans WHERE blob_key = ?", (blob_key,))
    conn.execute("INSERT INTO threads VALUES (?, ?, ?, ?)",
                 (user_id, thread_id, row["email_key"], email_id))
    if request.HasField("checks"):
        conn.execute("INSERT INTO message_checks VALUES (?, ?, ?)",
                     (user_id, email_id, request.checks.SerializeToString()))
    conn.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?)",
                 (user_id, request.delivery_key, email_id, time.time()))
    _count(conn, user_id, folder_id, 1, int(not request.is_read))
    conn.execute("UPDATE users SET used_bytes = used_bytes + ? WHERE user_id = ?",
                 (request.size, user_id))
    event = events_pb2.MailEvent(user_id=user_id)
    # The row just written, not read back: a SELECT * would copy the bodies again.
    event.message_added.message.CopyFrom(_summary(row))
    event.folders.append(_with_counts(conn, user_id, folder))
    _emit(conn, event)
    return StoredDelivery(email_id, created=True)


def _store_attachments(conn: sqlite3.Connection, email_id: str,
                       attachments: Iterable[common_pb2.Attachment]) -> list[tuple[str, str]]:
    owners: list[tuple[str, str]] = []
    used: set[str] = set()
    for position, attachment in enumerate(attachments):
        attachment_id = attachment.attachment_id
        if not attachment_id or attachment_id in used:
            attachment_id = str(position + 1)
        if attachment_id in used:
            attachment_id = ids.new_id()
        used.add(attachment_id)
        conn.execute(
            "INSERT INTO attachments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (email_id, attachment_id, position, attachment.filename, attachment.content_type,
             attachment.size, attachment.blob_key, attachment.content_id,
             int(attachment.inline)))
        owners.append((attachment.blob_key, f"{email_id}/attachment/{attachment_id}"))
    return owners
