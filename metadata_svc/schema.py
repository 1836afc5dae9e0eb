"""Every metadata table, declared once: columns, partition key, clustering key and order.

The SQLite adapter (store_sqlite.py) and the ScyllaDB adapter (store_scylla.py) implement
the same tables. From these definitions come the CQL schema (``cql_schema``), every CQL
statement the ScyllaDB adapter runs (``cql_statements``; no hand-written CQL strings
elsewhere) and the SQLite shape the SQLite adapter's tables must have (tests/unit/
test_schema.py compares it with PRAGMA table_info, so the two cannot drift).

Statement builders refuse anything a CQL cluster would serve with a scan: a WHERE must
name the whole partition key, then clustering columns in order, with a range only on the
last one named; ALLOW FILTERING is never emitted. Each Statement lists the column every
bind marker stands for, so tests can check what an adapter binds against it.

``cql_migration`` plans what ``mailgrid migrate`` runs on an existing keyspace: missing
tables are created and missing columns added (ALTER TABLE ... ADD), nothing is dropped.

Types are CQL type names; ``timeuuid`` is stored in SQLite as its canonical text,
``timeuuid_key`` is a TIMEUUID clustering column that SQLite keeps as ids.time_sort_key
bytes (which sort as ScyllaDB sorts TIMEUUIDs: by time).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Order = Literal["ASC", "DESC"]
Backend = Literal["sqlite", "scylla"]

# CQL type → SQLite column type.
SQLITE_TYPES: dict[str, str] = {
    "text": "TEXT", "ascii": "TEXT", "timeuuid": "TEXT", "uuid": "TEXT",
    "timeuuid_key": "BLOB", "blob": "BLOB", "boolean": "INTEGER", "int": "INTEGER",
    "bigint": "INTEGER", "counter": "INTEGER", "double": "REAL",
}
_CQL_TYPES = {"timeuuid_key": "timeuuid"}
_RANGE_OPS = {"<", "<=", ">", ">="}


@dataclass(frozen=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    partition_key: tuple[str, ...]
    # Clustering columns and their order, outermost first.
    clustering: tuple[tuple[str, Order], ...] = ()
    # Which adapters have this table (a table a backend cannot serve by key has a twin
    # shaped for the other backend).
    backends: frozenset[Backend] = field(default=frozenset({"sqlite", "scylla"}))
    doc: str = ""

    @property
    def primary_key(self) -> tuple[str, ...]:
        return (*self.partition_key, *(name for name, _ in self.clustering))

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def is_counter_table(self) -> bool:
        return any(c.type == "counter" for c in self.columns)

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"{self.name} has no column {name!r}")


def _cols(spec: str) -> tuple[Column, ...]:
    """'a text, b int' → Columns."""
    out = []
    for item in spec.split(","):
        name, type_ = item.split()
        out.append(Column(name, type_))
    return tuple(out)


_SUMMARY = ("email_id timeuuid, from_name text, from_email text, subject text, "
            "preview text, date double, is_read boolean, is_starred boolean, "
            "has_attachments boolean, size bigint, thread_id text")

TABLES: tuple[Table, ...] = (
    Table("users_by_address", _cols(
        "address text, user_id text, password_hash text, quota_bytes bigint, "
        "created_at double"), ("address",),
        doc="address → user (LWT IF NOT EXISTS makes an address taken once)"),
    Table("users", _cols(
        "user_id text, address text, quota_bytes bigint, used_bytes bigint, "
        "created_at double"), ("user_id",),
        doc="user id → user; used_bytes changes by compare-and-set (LWT) on Scylla"),
    Table("user_ids_by_shard", _cols("shard int, user_id text"), ("shard",),
          (("user_id", "ASC"),), backends=frozenset({"scylla"}),
          doc="Scylla only: list_users pages by user id, and a cluster orders the users "
              "table by token, not by id (SQLite pages its users table by primary key); "
              "USER_SHARDS partitions (shard_of(user_id)), each in id order, merged"),
    Table("folders_by_user", _cols("user_id text, folder_id text, name text, role int"),
          ("user_id",), (("folder_id", "ASC"),)),
    Table("folder_counters", _cols(
        "user_id text, folder_id text, total counter, unread counter"),
        ("user_id",), (("folder_id", "ASC"),), doc="folder totals (a CQL counter table)"),
    Table("emails_by_folder", _cols(
        f"user_id text, folder_id text, email_key timeuuid_key, {_SUMMARY}"),
        ("user_id", "folder_id"), (("email_key", "DESC"),)),
    Table("unread_emails", _cols(
        f"user_id text, folder_id text, email_key timeuuid_key, {_SUMMARY}"),
        ("user_id", "folder_id"), (("email_key", "DESC"),),
        doc="Xu's unread table: marking read moves the row out"),
    Table("emails_by_user", _cols(
        "user_id text, email_id timeuuid, folder_id text, email_key timeuuid_key, "
        "message_id text, in_reply_to text, references_json text, to_json text, "
        "cc_json text, bcc_json text, reply_to_json text, received_at double, "
        "text_body text, html_body text, blob_key text, parse_problems_json text, "
        "delivery_key text, from_name text, from_email text, subject text, "
        "preview text, date double, is_read boolean, is_starred boolean, "
        "has_attachments boolean, size bigint, thread_id text, bodies_from_raw boolean"),
        ("user_id",), (("email_id", "ASC"),)),
    Table("attachments", _cols(
        "email_id timeuuid, attachment_id text, position int, filename text, "
        "content_type text, size bigint, blob_key text, content_id text, inline boolean"),
        ("email_id",), (("attachment_id", "ASC"),)),
    Table("threads", _cols(
        "user_id text, thread_id text, email_key timeuuid_key, email_id timeuuid"),
        ("user_id", "thread_id"), (("email_key", "ASC"),)),
    Table("thread_ids_by_message_id", _cols("user_id text, message_id text, thread_id text"),
          ("user_id",), (("message_id", "ASC"),)),
    Table("deliveries", _cols(
        "user_id text, delivery_key text, email_id timeuuid, created_at double"),
        ("user_id",), (("delivery_key", "ASC"),),
        doc="idempotent filing: INSERT ... IF NOT EXISTS on Scylla"),
    Table("blob_refs", _cols("blob_key text, owner text"), ("blob_key",),
          (("owner", "ASC"),)),
    Table("blob_orphans", _cols("blob_key text, since double"), ("blob_key",),
          backends=frozenset({"sqlite"}),
          doc="SQLite finds old orphans with a scan on since; Scylla keeps them in "
              "blob_orphans_by_shard"),
    Table("blob_orphans_by_shard", _cols("shard int, blob_key text, since double"),
          ("shard",), (("blob_key", "ASC"),), backends=frozenset({"scylla"}),
          doc="Scylla only: a cluster cannot list a table without a token-range scan, so "
              "orphans live in ORPHAN_SHARDS partitions (shard_of(blob_key)) that the "
              "sweeper reads whole; a blob key still names one row (the full primary key)"),
    Table("message_checks", _cols("user_id text, email_id timeuuid, verdict blob"),
          ("user_id",), (("email_id", "ASC"),)),
    Table("sender_lists", _cols(
        "user_id text, sender text, allow boolean, source text, updated_at double"),
        ("user_id",), (("sender", "ASC"),)),
    Table("event_outbox", _cols("seq bigint, event_id text, user_id text, payload blob"),
          ("seq",), backends=frozenset({"sqlite"}),
          doc="SQLite: AUTOINCREMENT seq, read in seq order"),
    Table("event_outbox_by_shard", _cols(
        "shard int, event_key timeuuid_key, event_id text, user_id text, payload blob"),
        ("shard",), (("event_key", "ASC"),), backends=frozenset({"scylla"}),
        doc="Scylla's outbox: a fixed number of shard partitions, oldest first in each"),
)

BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}
# Partitions of the Scylla-only shard tables (a setting would change the meaning of
# stored rows): event_outbox_by_shard, user_ids_by_shard, blob_orphans_by_shard.
OUTBOX_SHARDS = 16
USER_SHARDS = 16
ORPHAN_SHARDS = 16


def shard_of(key: str, shards: int) -> int:
    """The partition of a shard table a key belongs to (stable across processes)."""
    return zlib.crc32(key.encode()) % shards


def tables_for(backend: Backend) -> list[Table]:
    return [t for t in TABLES if backend in t.backends]


# ---------------------------------------------------------------- SQLite


def sqlite_type(column: Column) -> str:
    return SQLITE_TYPES[column.type]


def sqlite_create_table(table: Table) -> str:
    """The SQLite table this definition stands for (what store_sqlite.py must create)."""
    cols = ", ".join(f"{c.name} {sqlite_type(c)} NOT NULL" for c in table.columns)
    return (f"CREATE TABLE IF NOT EXISTS {table.name} ({cols}, "
            f"PRIMARY KEY ({', '.join(table.primary_key)})) WITHOUT ROWID")


# ---------------------------------------------------------------- CQL


def cql_type(column: Column) -> str:
    return _CQL_TYPES.get(column.type, column.type)


def cql_create_keyspace(keyspace: str, replication: dict[str, str | int]) -> str:
    items = ", ".join(f"'{k}': {v!r}" if isinstance(v, str) else f"'{k}': {v}"
                      for k, v in {"class": "NetworkTopologyStrategy", **replication}.items())
    return (f"CREATE KEYSPACE IF NOT EXISTS {_ident(keyspace)} "
            f"WITH replication = {{{items}}}")


def cql_create_table(table: Table, keyspace: str) -> str:
    cols = ", ".join(f"{c.name} {cql_type(c)}" for c in table.columns)
    partition = ", ".join(table.partition_key)
    clustering = "".join(f", {name}" for name, _ in table.clustering)
    text = (f"CREATE TABLE IF NOT EXISTS {_ident(keyspace)}.{table.name} ({cols}, "
            f"PRIMARY KEY (({partition}){clustering}))")
    if table.clustering:
        order = ", ".join(f"{name} {o}" for name, o in table.clustering)
        text += f" WITH CLUSTERING ORDER BY ({order})"
    return text


def cql_schema(keyspace: str, replication: dict[str, str | int]) -> list[str]:
    """Keyspace and every Scylla table, in order (``mailgrid migrate`` on a new keyspace)."""
    return [cql_create_keyspace(keyspace, replication),
            *(cql_create_table(t, keyspace) for t in tables_for("scylla"))]


# ---------------------------------------------------------------- migration

# Type names a cluster may describe a column with, and the name schema.py uses.
_CQL_ALIASES = {"varchar": "text"}


class SchemaConflict(ValueError):
    """An existing table cannot become its definition by adding columns."""


def cql_add_column(table: Table, column: Column, keyspace: str) -> str:
    return (f"ALTER TABLE {_ident(keyspace)}.{table.name} "
            f"ADD {_ident(column.name)} {cql_type(column)}")


def cql_migration(keyspace: str, replication: dict[str, str | int],
                  existing: Mapping[str, Mapping[str, str]] | None) -> list[str]:
    """What ``mailgrid migrate`` runs, given what the keyspace holds: ``existing`` maps
    each existing table to its columns and their CQL types (None: no keyspace yet).

    A missing table is created, a missing column is added (ALTER TABLE ... ADD); nothing
    is ever dropped, tables or columns schema.py does not know are left alone, and an
    existing keyspace keeps its replication (changing it is an operator's decision). A
    column of another type, or a missing key column (CQL cannot add one), raises
    SchemaConflict: such a change needs a new table and a copy, by hand.
    """
    if existing is None:
        return cql_schema(keyspace, replication)
    statements: list[str] = []
    for table in tables_for("scylla"):
        columns = existing.get(table.name)
        if columns is None:
            statements.append(cql_create_table(table, keyspace))
            continue
        have = {name: _CQL_ALIASES.get(t.lower(), t.lower()) for name, t in columns.items()}
        for column in table.columns:
            found = have.get(column.name)
            if found is None and column.name in table.primary_key:
                raise SchemaConflict(
                    f"{keyspace}.{table.name} lacks key column {column.name}: a primary key "
                    "cannot change; create the table anew and copy the rows")
            if found is None:
                statements.append(cql_add_column(table, column, keyspace))
            elif found != cql_type(column):
                raise SchemaConflict(
                    f"{keyspace}.{table.name}.{column.name} is {found}, schema.py says "
                    f"{cql_type(column)}: a column type cannot change in place")
    return statements


# ---------------------------------------------------------------- statements

# What a LIMIT bind marker stands for in Statement.params.
LIMIT = "[limit]"


@dataclass(frozen=True)
class Statement:
    """A generated CQL statement and the key columns its WHERE names, in order."""

    table: str
    cql: str
    where: tuple[str, ...] = ()
    # The clustering column bounded by a range (its last WHERE column), if any.
    range_op: str = ""
    lwt: bool = False
    # The column each bind marker stands for, in marker order (LIMIT for a LIMIT ?).
    params: tuple[str, ...] = ()


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise ValueError(f"not a CQL identifier: {name!r}")
    return name


def _check_key_prefix(table: Table, where: Sequence[str], range_op: str) -> None:
    """A WHERE on the whole partition key, then clustering columns in order."""
    n = len(table.partition_key)
    if tuple(where[:n]) != table.partition_key:
        raise ValueError(f"{table.name}: WHERE {list(where)} does not name the partition "
                         f"key {list(table.partition_key)}")
    clustering = [name for name, _ in table.clustering]
    if list(where[n:]) != clustering[:len(where) - n]:
        raise ValueError(f"{table.name}: WHERE {list(where)} skips clustering columns "
                         f"{clustering}")
    if range_op and (range_op not in _RANGE_OPS or len(where) == n):
        raise ValueError(f"{table.name}: a range needs a clustering column")


def _where(table: Table, where: Sequence[str], range_op: str = "") -> str:
    _check_key_prefix(table, where, range_op)
    parts = [f"{name} = ?" for name in where]
    if range_op:
        parts[-1] = f"{where[-1]} {range_op} ?"
    return " AND ".join(parts)


def _if(table: Table, if_columns: Sequence[str]) -> str:
    """An LWT condition on non-key columns (compare-and-set on the values read)."""
    for name in if_columns:
        if name in table.primary_key:
            raise ValueError(f"{table.name}: cannot IF a key column {name!r}")
        table.column(name)
    return " IF " + " AND ".join(f"{n} = ?" for n in if_columns) if if_columns else ""


def select(table: Table, keyspace: str, where: Sequence[str], *,
           columns: Sequence[str] = (), range_op: str = "", limit: bool = False
           ) -> Statement:
    for name in columns:
        table.column(name)
    cql = (f"SELECT {', '.join(columns) or '*'} FROM {_ident(keyspace)}.{table.name} "
           f"WHERE {_where(table, where, range_op)}")
    if limit:
        cql += " LIMIT ?"
    return Statement(table.name, cql, tuple(where), range_op,
                     params=(*where, *((LIMIT,) if limit else ())))


def insert(table: Table, keyspace: str, *, if_not_exists: bool = False) -> Statement:
    if table.is_counter_table:
        raise ValueError(f"{table.name} is a counter table: UPDATE it")
    names = table.column_names
    cql = (f"INSERT INTO {_ident(keyspace)}.{table.name} ({', '.join(names)}) "
           f"VALUES ({', '.join('?' * len(names))})")
    if if_not_exists:
        cql += " IF NOT EXISTS"
    return Statement(table.name, cql, lwt=if_not_exists, params=names)


def update(table: Table, keyspace: str, set_columns: Sequence[str], *,
           if_columns: Sequence[str] = ()) -> Statement:
    """UPDATE of one row (the whole primary key) ; ``if_columns`` makes it an LWT."""
    key = table.primary_key
    for name in set_columns:
        if name in key:
            raise ValueError(f"{table.name}: cannot SET a key column {name!r}")
        table.column(name)
    if table.is_counter_table:
        sets = ", ".join(f"{n} = {n} + ?" for n in set_columns)
    else:
        sets = ", ".join(f"{n} = ?" for n in set_columns)
    cql = (f"UPDATE {_ident(keyspace)}.{table.name} SET {sets} WHERE {_where(table, key)}"
           f"{_if(table, if_columns)}")
    return Statement(table.name, cql, key, lwt=bool(if_columns),
                     params=(*set_columns, *key, *if_columns))


def delete(table: Table, keyspace: str, where: Sequence[str] | None = None, *,
           if_columns: Sequence[str] = ()) -> Statement:
    """DELETE of one row (default) or of a key prefix (a whole partition);
    ``if_columns`` (one row only) makes it an LWT that deletes only unchanged rows."""
    names = tuple(where) if where is not None else table.primary_key
    if if_columns and names != table.primary_key:
        raise ValueError(f"{table.name}: a conditional DELETE names one row")
    cql = (f"DELETE FROM {_ident(keyspace)}.{table.name} WHERE {_where(table, names)}"
           f"{_if(table, if_columns)}")
    return Statement(table.name, cql, names, lwt=bool(if_columns),
                     params=(*names, *if_columns))


# The state an update or delete of a message compares-and-sets (see store_scylla).
EMAIL_STATE = ("folder_id", "is_read", "is_starred")


def cql_statements(keyspace: str) -> dict[str, Statement]:
    """Every statement store_scylla.py prepares, by name."""
    t = BY_NAME
    ks = keyspace
    summary = tuple(c.name for c in t["emails_by_folder"].columns[3:])
    return {
        "user_by_address": select(t["users_by_address"], ks, ["address"]),
        "insert_user_by_address": insert(t["users_by_address"], ks, if_not_exists=True),
        "user": select(t["users"], ks, ["user_id"]),
        "insert_user": insert(t["users"], ks),
        "set_used_bytes": update(t["users"], ks, ["used_bytes"], if_columns=["used_bytes"]),
        "insert_user_id": insert(t["user_ids_by_shard"], ks),
        "user_ids_after": select(t["user_ids_by_shard"], ks, ["shard", "user_id"],
                                 columns=["user_id"], range_op=">", limit=True),
        "folders": select(t["folders_by_user"], ks, ["user_id"]),
        "insert_folder": insert(t["folders_by_user"], ks),
        "folder_counts": select(t["folder_counters"], ks, ["user_id"]),
        "add_to_folder_counts": update(t["folder_counters"], ks, ["total", "unread"]),
        "folder_page": select(t["emails_by_folder"], ks, ["user_id", "folder_id"],
                              columns=summary, limit=True),
        "folder_page_after": select(t["emails_by_folder"], ks,
                                    ["user_id", "folder_id", "email_key"], columns=summary,
                                    range_op="<", limit=True),
        "unread_page": select(t["unread_emails"], ks, ["user_id", "folder_id"],
                              columns=summary, limit=True),
        "unread_page_after": select(t["unread_emails"], ks,
                                    ["user_id", "folder_id", "email_key"], columns=summary,
                                    range_op="<", limit=True),
        "insert_listing": insert(t["emails_by_folder"], ks),
        "delete_listing": delete(t["emails_by_folder"], ks),
        "insert_unread": insert(t["unread_emails"], ks),
        "delete_unread": delete(t["unread_emails"], ks),
        "email": select(t["emails_by_user"], ks, ["user_id", "email_id"]),
        "insert_email": insert(t["emails_by_user"], ks),
        "set_email_state": update(t["emails_by_user"], ks, EMAIL_STATE,
                                  if_columns=EMAIL_STATE),
        "delete_email": delete(t["emails_by_user"], ks),
        "delete_email_if_unchanged": delete(t["emails_by_user"], ks,
                                            if_columns=EMAIL_STATE),
        "attachments": select(t["attachments"], ks, ["email_id"]),
        "insert_attachment": insert(t["attachments"], ks),
        "delete_attachments": delete(t["attachments"], ks, ["email_id"]),
        "insert_thread_member": insert(t["threads"], ks),
        "delete_thread_member": delete(t["threads"], ks),
        "thread_of_message_id": select(t["thread_ids_by_message_id"], ks,
                                       ["user_id", "message_id"], columns=["thread_id"]),
        "insert_thread_of_message_id": insert(t["thread_ids_by_message_id"], ks,
                                              if_not_exists=True),
        "delivery": select(t["deliveries"], ks, ["user_id", "delivery_key"],
                           columns=["email_id"]),
        "insert_delivery": insert(t["deliveries"], ks, if_not_exists=True),
        "insert_blob_ref": insert(t["blob_refs"], ks),
        "delete_blob_ref": delete(t["blob_refs"], ks),
        "any_blob_ref": select(t["blob_refs"], ks, ["blob_key"], columns=["owner"],
                               limit=True),
        "orphan": select(t["blob_orphans_by_shard"], ks, ["shard", "blob_key"],
                         columns=["since"]),
        "orphans_of_shard": select(t["blob_orphans_by_shard"], ks, ["shard"],
                                   columns=["blob_key", "since"]),
        "insert_orphan": insert(t["blob_orphans_by_shard"], ks),
        "delete_orphan": delete(t["blob_orphans_by_shard"], ks),
        "claim_orphan": delete(t["blob_orphans_by_shard"], ks, if_columns=["since"]),
        "message_check": select(t["message_checks"], ks, ["user_id", "email_id"],
                                columns=["verdict"]),
        "insert_message_check": insert(t["message_checks"], ks),
        "delete_message_check": delete(t["message_checks"], ks),
        "sender_lists": select(t["sender_lists"], ks, ["user_id"],
                               columns=["sender", "allow", "source"]),
        "insert_sender": insert(t["sender_lists"], ks),
        "delete_sender": delete(t["sender_lists"], ks),
        "insert_event": insert(t["event_outbox_by_shard"], ks),
        "events_of_shard": select(t["event_outbox_by_shard"], ks, ["shard"], limit=True),
        "delete_event": delete(t["event_outbox_by_shard"], ks),
    }


def cql_truncate(table: Table, keyspace: str) -> str:
    """Empties a table (test fixtures against a disposable keyspace)."""
    return f"TRUNCATE {_ident(keyspace)}.{table.name}"
