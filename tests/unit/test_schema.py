"""What metadata_svc/schema.py generates: CQL a cluster serves by key, and the SQLite
tables store_sqlite.py really creates (so the two adapters cannot drift apart)."""

from __future__ import annotations

import re
import sqlite3

import pytest

from metadata_svc import schema
from metadata_svc.store_sqlite import SCHEMA

KS = "mailgrid"
STATEMENTS = schema.cql_statements(KS)
CREATES = schema.cql_schema(KS, {"replication_factor": 3})


def _where_columns(cql: str) -> list[str]:
    where = cql.split(" WHERE ", 1)[1]
    where = re.split(r" LIMIT | IF ", where)[0]
    return [re.match(r"(\w+) (=|<|<=|>|>=) \?$", part).group(1)  # type: ignore[union-attr]
            for part in where.split(" AND ")]


def test_every_table_has_a_partition_key_of_its_own_columns() -> None:
    for table in schema.TABLES:
        assert table.partition_key, table.name
        for name in table.primary_key:
            table.column(name)
        assert len(set(table.column_names)) == len(table.column_names), table.name


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_statement_where_is_the_partition_key_then_clustering_in_order(name: str) -> None:
    statement = STATEMENTS[name]
    table = schema.BY_NAME[statement.table]
    assert "scylla" in table.backends
    assert "ALLOW FILTERING" not in statement.cql.upper()
    if statement.cql.startswith("INSERT"):
        return
    where = _where_columns(statement.cql)
    assert where == list(statement.where)
    keys = list(table.partition_key)
    assert where[:len(keys)] == keys
    clustering = [c for c, _ in table.clustering]
    assert where[len(keys):] == clustering[:len(where) - len(keys)]
    ranges = re.findall(r"\w+ (<|<=|>|>=) \?", statement.cql)
    assert len(ranges) <= 1
    if ranges:
        assert re.search(rf"{where[-1]} (<|<=|>|>=) \?", statement.cql)


def test_statements_only_name_columns_of_their_table() -> None:
    for statement in STATEMENTS.values():
        table = schema.BY_NAME[statement.table]
        words = set(re.findall(r"\b[a-z_]+\b", statement.cql))
        sql_words = {"and", "if", "not", "exists"}
        unknown = {w for w in words if "_" in w and w not in table.column_names
                   and w != table.name and w not in sql_words}
        assert not unknown, (statement.cql, unknown)


def test_mailbox_writes_that_need_one_order_are_lightweight_transactions() -> None:
    for name in ("insert_user_by_address", "insert_delivery", "set_used_bytes"):
        assert STATEMENTS[name].lwt
    assert STATEMENTS["insert_delivery"].cql.endswith(" IF NOT EXISTS")
    assert STATEMENTS["set_used_bytes"].cql.endswith(" IF used_bytes = ?")


def test_builders_refuse_a_query_that_would_scan() -> None:
    folder = schema.BY_NAME["emails_by_folder"]
    with pytest.raises(ValueError, match="partition key"):
        schema.select(folder, KS, ["user_id"])
    with pytest.raises(ValueError, match="partition key"):
        schema.select(folder, KS, ["folder_id", "user_id"])
    threads = schema.BY_NAME["emails_by_user"]
    with pytest.raises(ValueError, match="a range needs a clustering column"):
        schema.select(threads, KS, ["user_id"], range_op="<")
    with pytest.raises(ValueError, match="counter table"):
        schema.insert(schema.BY_NAME["folder_counters"], KS)
    with pytest.raises(ValueError, match="identifier"):
        schema.cql_schema("bad-name; DROP", {"replication_factor": 1})


def test_cql_schema_has_clustering_order_timeuuid_ids_and_a_counter_table() -> None:
    by_table = {re.search(rf"{KS}\.(\w+)", c).group(1): c  # type: ignore[union-attr]
                for c in CREATES[1:]}
    assert CREATES[0] == (f"CREATE KEYSPACE IF NOT EXISTS {KS} WITH replication = "
                          "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}")
    assert by_table["emails_by_folder"] == (
        "CREATE TABLE IF NOT EXISTS mailgrid.emails_by_folder (user_id text, folder_id text, "
        "email_key timeuuid, email_id timeuuid, from_name text, from_email text, "
        "subject text, preview text, date double, is_read boolean, is_starred boolean, "
        "has_attachments boolean, size bigint, thread_id text, "
        "PRIMARY KEY ((user_id, folder_id), email_key)) "
        "WITH CLUSTERING ORDER BY (email_key DESC)")
    assert "email_id timeuuid" in by_table["emails_by_user"]
    assert "total counter, unread counter" in by_table["folder_counters"]
    assert "blob_orphans" not in by_table and "event_outbox" not in by_table
    assert set(by_table) == {t.name for t in schema.tables_for("scylla")}


def test_sqlite_tables_are_the_declared_tables() -> None:
    """PRAGMA table_info of what SQLiteMetadataStore creates == the definitions."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(_sqlite_schema_script())
    created = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    assert created == {t.name for t in schema.tables_for("sqlite")}
    for table in schema.tables_for("sqlite"):
        info = conn.execute(f"PRAGMA table_info({table.name})").fetchall()
        assert [(r[1], r[2]) for r in info] == [
            (c.name, schema.sqlite_type(c)) for c in table.columns], table.name
        key = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
        assert key == list(table.primary_key), table.name


def test_generated_sqlite_tables_match_the_adapter_tables() -> None:
    conn = sqlite3.connect(":memory:")
    for table in schema.tables_for("sqlite"):
        if table.name != "event_outbox":  # AUTOINCREMENT needs a rowid table
            conn.execute(schema.sqlite_create_table(table))
    ours = sqlite3.connect(":memory:")
    ours.executescript(_sqlite_schema_script())
    for table in schema.tables_for("sqlite"):
        if table.name != "event_outbox":
            assert (conn.execute(f"PRAGMA table_info({table.name})").fetchall()
                    == ours.execute(f"PRAGMA table_info({table.name})").fetchall())


def _sqlite_schema_script() -> str:
    return SCHEMA


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_each_bind_marker_stands_for_a_column_of_its_table(name: str) -> None:
    statement = STATEMENTS[name]
    table = schema.BY_NAME[statement.table]
    assert statement.cql.count("?") == len(statement.params)
    for column in statement.params:
        if column != schema.LIMIT:
            table.column(column)
    if " LIMIT ?" in statement.cql:
        assert statement.params[-1] == schema.LIMIT
    assert statement.lwt == (" IF " in statement.cql)


def test_message_changes_compare_and_set_the_state_they_read() -> None:
    assert STATEMENTS["set_email_state"].cql.endswith(
        " IF folder_id = ? AND is_read = ? AND is_starred = ?")
    assert STATEMENTS["delete_email_if_unchanged"].params == (
        "user_id", "email_id", "folder_id", "is_read", "is_starred")
    assert STATEMENTS["claim_orphan"].cql == (
        f"DELETE FROM {KS}.blob_orphans_by_shard WHERE shard = ? AND blob_key = ? "
        "IF since = ?")
    with pytest.raises(ValueError, match="names one row"):
        schema.delete(schema.BY_NAME["attachments"], KS, ["email_id"], if_columns=["size"])
    with pytest.raises(ValueError, match="key column"):
        schema.update(schema.BY_NAME["users"], KS, ["used_bytes"], if_columns=["user_id"])


def test_scylla_only_tables_say_why_sqlite_has_no_twin() -> None:
    sqlite_names = {t.name for t in schema.tables_for("sqlite")}
    for table in schema.tables_for("scylla"):
        if table.name not in sqlite_names:
            assert table.backends == frozenset({"scylla"})
            assert table.doc, table.name
    assert {t.name for t in schema.tables_for("scylla")} - sqlite_names == {
        "user_ids_by_shard", "blob_orphans_by_shard", "event_outbox_by_shard"}


def test_shard_of_is_stable_and_in_range() -> None:
    assert schema.shard_of("alice", 16) == schema.shard_of("alice", 16)
    assert {schema.shard_of(str(i), 16) for i in range(200)} == set(range(16))


# migrate: a pure planner over what the keyspace holds


def _described(*, skip_tables: tuple[str, ...] = (),
               skip_columns: tuple[tuple[str, str], ...] = ()) -> dict[str, dict[str, str]]:
    """A keyspace as the driver describes it, built from the definitions."""
    return {t.name: {c.name: schema.cql_type(c) for c in t.columns
                     if (t.name, c.name) not in skip_columns}
            for t in schema.tables_for("scylla") if t.name not in skip_tables}


def test_migrating_no_keyspace_creates_keyspace_and_every_table() -> None:
    assert schema.cql_migration(KS, {"replication_factor": 3}, None) == CREATES


def test_migrating_an_up_to_date_keyspace_runs_nothing() -> None:
    assert schema.cql_migration(KS, {"replication_factor": 3}, _described()) == []


def test_migration_adds_missing_columns_and_creates_missing_tables_only() -> None:
    existing = _described(
        skip_tables=("blob_orphans_by_shard",),
        skip_columns=(("emails_by_user", "parse_problems_json"), ("emails_by_user", "size"),
                      ("folder_counters", "unread")))
    existing["emails_by_user"]["legacy_column"] = "text"  # left alone, never dropped
    existing["old_table"] = {"id": "text"}
    assert schema.cql_migration(KS, {"replication_factor": 3}, existing) == [
        f"ALTER TABLE {KS}.folder_counters ADD unread counter",
        f"ALTER TABLE {KS}.emails_by_user ADD parse_problems_json text",
        f"ALTER TABLE {KS}.emails_by_user ADD size bigint",
        next(c for c in CREATES if f"{KS}.blob_orphans_by_shard " in c),
    ]


def test_migration_reads_type_aliases_and_timeuuid_keys_as_the_same_type() -> None:
    existing = _described()
    existing["users"]["address"] = "varchar"
    existing["emails_by_folder"]["email_key"] = "timeuuid"
    assert schema.cql_migration(KS, {"replication_factor": 1}, existing) == []


def test_migration_refuses_a_changed_type_or_a_missing_key_column() -> None:
    existing = _described()
    existing["users"]["used_bytes"] = "int"
    with pytest.raises(schema.SchemaConflict, match=r"users\.used_bytes is int"):
        schema.cql_migration(KS, {"replication_factor": 1}, existing)
    with pytest.raises(schema.SchemaConflict, match="lacks key column email_key"):
        schema.cql_migration(KS, {"replication_factor": 1}, _described(
            skip_columns=(("threads", "email_key"),)))
