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
