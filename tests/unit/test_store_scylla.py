"""The parts of the ScyllaDB adapter that need no cluster: URLs, replication, the
statements it runs, a cluster that cannot be reached, and every method of the port run
against RecordingSession, a test double of the driver's session (not of a server): it
checks each execution against the generated statement and answers with canned rows."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from mailgrid import ids
from mailgrid.errors import InvalidArgument, MailgridError, NotFound, Unavailable
from mailgrid.natsd import free_port
from mailgrid.v1 import common_pb2, events_pb2, metadata_pb2
from metadata_svc import schema, store_scylla
from metadata_svc.ports import DEFAULT_FOLDERS, StoredDelivery
from metadata_svc.store_scylla import ScyllaLocation, ScyllaMetadataStore, parse_replication
from metadata_svc.store_sqlite import SQLiteMetadataStore

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def test_url_names_hosts_port_keyspace_and_local_dc() -> None:
    assert ScyllaLocation.from_url("scylla://s1:9142,s2:9142/mail?dc=eu") == \
        ScyllaLocation(("s1", "s2"), 9142, "mail", "eu")
    assert ScyllaLocation.from_url("scylla://10.0.0.1/mail") == \
        ScyllaLocation(("10.0.0.1",), 9042, "mail", None)


@pytest.mark.parametrize("url", ["scylla://h1/", "scylla:///ks", "scylla://h1:1,h2:2/ks",
                                 "scylla://h1/bad-keyspace", "sqlite:///x"])
def test_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        ScyllaLocation.from_url(url)


def test_replication_setting_becomes_keyspace_options() -> None:
    assert parse_replication("replication_factor=3") == {"replication_factor": 3}
    assert parse_replication("eu=3, us=2") == {"eu": 3, "us": 2}
    with pytest.raises(ValueError):
        parse_replication("three")


def test_every_statement_the_adapter_runs_is_generated() -> None:
    source = Path(store_scylla.__file__).read_text()
    used = set(re.findall(r'_run\(\s*"(\w+)"', source))
    used |= set(re.findall(r'\("(delete_\w+)", \(', source))
    used |= {f"{name}_after" for name in ("folder_page", "unread_page")}
    used |= {"folder_page", "unread_page"}
    generated = set(schema.cql_statements("ks"))
    assert used <= generated, used - generated
    assert "insert_delivery" in used and "set_used_bytes" in used


async def test_unreachable_cluster_raises_unavailable() -> None:
    location = ScyllaLocation(("127.0.0.1",), free_port(), "mailgrid")
    with pytest.raises(Unavailable):
        await ScyllaMetadataStore.open(location)


# --------------------------------------------------------------------------------------
# The adapter's methods against a recording test double of the driver session.


_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "text": str, "ascii": str, "boolean": bool, "int": int, "bigint": int, "counter": int,
    "double": (int, float), "blob": bytes, "timeuuid": uuid.UUID,
    "timeuuid_key": uuid.UUID, "uuid": uuid.UUID,
}


@dataclass(frozen=True)
class PreparedCql:
    """What RecordingSession.prepare returns: the generated statement it was given."""

    name: str
    statement: schema.Statement


@dataclass(frozen=True)
class Call:
    name: str
    params: tuple[Any, ...]


class Pages:
    """A canned answer of several result pages."""

    def __init__(self, *pages: list[dict[str, Any]]) -> None:
        self.pages = list(pages)


class AnsweredFuture:
    """The part of the driver's ResponseFuture the adapter uses, answered at once."""

    def __init__(self, pages: list[list[dict[str, Any]]]) -> None:
        self._pages = pages
        self.has_more_pages = False
        self._callback: Callable[[list[dict[str, Any]]], None] | None = None

    def add_callbacks(self, callback: Callable[[list[dict[str, Any]]], None],
                      errback: Callable[[BaseException], None]) -> None:
        self._callback = callback
        self.start_fetching_next_page()

    def start_fetching_next_page(self) -> None:
        assert self._callback is not None
        page = self._pages.pop(0)
        self.has_more_pages = bool(self._pages)
        self._callback(page)


Answer = list[dict[str, Any]] | Pages | Callable[[tuple[Any, ...]], list[dict[str, Any]]]


class RecordingSession:
    """A test double of scylla-driver's Session only (prepare, execute_async).

    It prepares only statements schema.cql_statements generates, checks every execution
    binds one value per bind marker, of the Python type the driver needs for that
    column's CQL type (never None), records it, and answers with canned rows: ``answers``
    by statement name, else [applied]=True for an LWT and no rows otherwise.
    """

    def __init__(self, keyspace: str = "ks") -> None:
        self._by_cql = {s.cql: (name, s) for name, s in schema.cql_statements(keyspace).items()}
        self.calls: list[Call] = []
        self.answers: dict[str, Answer] = {}

    def prepare(self, cql: str) -> PreparedCql:
        name, statement = self._by_cql[cql]
        return PreparedCql(name, statement)

    def execute_async(self, prepared: PreparedCql, params: Sequence[Any]) -> AnsweredFuture:
        statement = prepared.statement
        assert statement.cql.count("?") == len(statement.params) == len(params), \
            (prepared.name, statement.params, params)
        table = schema.BY_NAME[statement.table]
        for column, value in zip(statement.params, params, strict=True):
            _check_bound(prepared.name, table, column, value)
        self.calls.append(Call(prepared.name, tuple(params)))
        answer = self.answers.get(prepared.name)
        if isinstance(answer, Pages):
            return AnsweredFuture([list(p) for p in answer.pages])
        if callable(answer):
            rows = answer(tuple(params))
        elif answer is not None:
            rows = answer
        else:
            rows = [{"[applied]": True}] if statement.lwt else []
        return AnsweredFuture([rows])

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def writes(self) -> list[str]:
        """Names of the statements that changed something, in order."""
        reads = {n for n, s in schema.cql_statements("ks").items()
                 if s.cql.startswith("SELECT")}
        return [c.name for c in self.calls if c.name not in reads]

    def params(self, name: str) -> list[tuple[Any, ...]]:
        return [c.params for c in self.calls if c.name == name]

    def row(self, name: str, index: int = 0) -> dict[str, Any]:
        """The row an INSERT wrote, by column name."""
        statement = self.prepare(schema.cql_statements("ks")[name].cql).statement
        return dict(zip(statement.params, self.params(name)[index], strict=True))


def _check_bound(name: str, table: schema.Table, column: str, value: Any) -> None:
    if column == schema.LIMIT:
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, name
        return
    cql = table.column(column).type
    assert value is not None, (name, column)
    assert isinstance(value, _PY_TYPES[cql]), (name, column, cql, value)
    if cql in ("int", "bigint", "counter", "double"):
        assert not isinstance(value, bool), (name, column, value)
    if isinstance(value, uuid.UUID) and cql in ("timeuuid", "timeuuid_key"):
        assert value.version == 1, (name, column, value)


USER = "u-1"
EMAIL = ids.new_timeuuid()
RAW = "a" * 64
PHOTO = "b" * 64
FOLDER_IDS = {role: f"f-{name.lower()}" for name, role in DEFAULT_FOLDERS}
INBOX = FOLDER_IDS[common_pb2.FOLDER_ROLE_INBOX]
SPAM = FOLDER_IDS[common_pb2.FOLDER_ROLE_SPAM]
TRASH = FOLDER_IDS[common_pb2.FOLDER_ROLE_TRASH]
ARCHIVE = FOLDER_IDS[common_pb2.FOLDER_ROLE_ARCHIVE]


def user_row(user_id: str = USER, used_bytes: int = 500) -> dict[str, Any]:
    return {"user_id": user_id, "address": f"{user_id}@example.test", "quota_bytes": 0,
            "used_bytes": used_bytes, "created_at": 1_700_000_000.0}


def email_row(folder_id: str = INBOX, is_read: bool = False, is_starred: bool = False,
              ) -> dict[str, Any]:
    return {
        "user_id": USER, "email_id": EMAIL, "folder_id": folder_id, "email_key": EMAIL,
        "message_id": "m1@x.org", "in_reply_to": "", "references_json": "[]",
        "to_json": "[]", "cc_json": "[]", "bcc_json": "[]", "reply_to_json": "[]",
        "received_at": 1_700_000_100.0, "text_body": "hi", "html_body": "",
        "blob_key": RAW, "parse_problems_json": "[]", "delivery_key": "job-1",
        "from_name": "Ann", "from_email": "Ann@X.org", "subject": "hello", "preview": "hi",
        "date": 1_700_000_000.0, "is_read": is_read, "is_starred": is_starred,
        "has_attachments": True, "size": 300, "thread_id": str(EMAIL),
    }


@pytest.fixture
def session() -> RecordingSession:
    session = RecordingSession()
    session.answers.update({
        "user": lambda params: [user_row(params[0])],
        "folders": [{"user_id": USER, "folder_id": FOLDER_IDS[role], "name": name,
                     "role": int(role)} for name, role in DEFAULT_FOLDERS],
        "folder_counts": [{"user_id": USER, "folder_id": INBOX, "total": 1, "unread": 1}],
        "email": [email_row()],
        "attachments": [{"email_id": EMAIL, "attachment_id": "1", "position": 0,
                         "filename": "p.jpg", "content_type": "image/jpeg", "size": 10,
                         "blob_key": PHOTO, "content_id": "", "inline": False}],
    })
    return session


@pytest.fixture
def store(session: RecordingSession) -> ScyllaMetadataStore:
    store = ScyllaMetadataStore(ScyllaLocation(("scylla.invalid",), 9042, "ks"),
                                hasher=FAST_HASHER)
    store.use_session(session)
    return store


def only_event(session: RecordingSession) -> events_pb2.MailEvent:
    (params,) = session.params("insert_event")
    return events_pb2.MailEvent.FromString(params[4])


def test_every_generated_statement_prepares_on_the_recording_session(
        store: ScyllaMetadataStore) -> None:
    assert set(store._prepared) == set(schema.cql_statements("ks"))


async def test_marking_read_moves_the_row_out_of_unread_emails_and_counts_once(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    summary = await store.update_message(USER, str(EMAIL), is_read=True)
    assert summary.is_read and summary.folder_id == INBOX
    assert session.writes() == ["set_email_state", "delete_unread", "insert_listing",
                                "add_to_folder_counts", "insert_event"]
    assert session.params("set_email_state") == [
        (INBOX, True, False, USER, EMAIL, INBOX, False, False)]
    assert session.params("delete_unread") == [(USER, INBOX, EMAIL)]
    listing = session.row("insert_listing")
    assert (listing["folder_id"], listing["is_read"], listing["email_key"]) == (
        INBOX, True, EMAIL)
    assert session.params("add_to_folder_counts") == [(0, -1, USER, INBOX)]
    event = only_event(session)
    assert event.message_updated.message.is_read
    assert event.message_updated.previous_folder_id == ""
    assert [f.folder_id for f in event.folders] == [INBOX]


async def test_starring_rewrites_the_listing_rows_in_place_and_counts_nothing(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    await store.update_message(USER, str(EMAIL), is_starred=True)
    assert session.writes() == ["set_email_state", "insert_listing", "insert_unread",
                                "insert_event"]
    assert session.row("insert_unread")["is_starred"] is True
    assert list(only_event(session).folders) == []


async def test_moving_into_spam_moves_both_listings_counts_both_folders_and_blocks_sender(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    summary = await store.update_message(USER, str(EMAIL), folder="spam")
    assert summary.folder_id == SPAM
    assert session.writes() == [
        "set_email_state", "delete_listing", "delete_unread", "insert_listing",
        "insert_unread", "add_to_folder_counts", "add_to_folder_counts", "insert_sender",
        "insert_event"]
    assert session.params("delete_listing") == [(USER, INBOX, EMAIL)]
    assert session.row("insert_unread")["folder_id"] == SPAM
    assert session.params("add_to_folder_counts") == [(-1, -1, USER, INBOX),
                                                      (1, 1, USER, SPAM)]
    sender = session.row("insert_sender")
    assert (sender["sender"], sender["allow"], sender["source"]) == (
        "ann@x.org", False, "feedback")
    event = only_event(session)
    assert event.message_updated.previous_folder_id == INBOX
    assert {f.folder_id for f in event.folders} == {INBOX, SPAM}


async def test_moving_out_of_spam_allows_the_sender_but_not_into_trash(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    session.answers["email"] = [email_row(SPAM, is_read=True)]
    await store.update_message(USER, str(EMAIL), folder="archive")
    assert session.row("insert_sender")["allow"] is True
    assert "delete_unread" not in session.writes() and "insert_unread" not in session.writes()
    session.calls.clear()
    await store.update_message(USER, str(EMAIL), folder="trash")
    assert "insert_sender" not in session.writes()


async def test_a_change_that_changes_nothing_writes_nothing(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    summary = await store.update_message(USER, str(EMAIL), is_read=False, folder="inbox")
    assert summary.email_id == str(EMAIL) and not summary.is_read
    assert session.writes() == []


async def test_a_change_that_loses_its_compare_and_set_reads_again_and_counts_once(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    rows = [[email_row()], [email_row(is_starred=True)]]
    session.answers["email"] = lambda params: rows.pop(0) if len(rows) > 1 else rows[0]
    outcomes = [[{"[applied]": False, **email_row(is_starred=True)}], [{"[applied]": True}]]
    session.answers["set_email_state"] = lambda params: outcomes.pop(0)
    summary = await store.update_message(USER, str(EMAIL), is_read=True)
    assert summary.is_read and summary.is_starred
    assert [p[5:] for p in session.params("set_email_state")] == [
        (INBOX, False, False), (INBOX, False, True)]
    assert session.params("add_to_folder_counts") == [(0, -1, USER, INBOX)]
    assert len(session.params("insert_event")) == 1


async def test_a_change_that_keeps_losing_is_unavailable_and_writes_no_listing(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    session.answers["set_email_state"] = [{"[applied]": False}]
    with pytest.raises(Unavailable):
        await store.update_message(USER, str(EMAIL), is_read=True)
    assert set(session.writes()) == {"set_email_state"}


async def test_unknown_or_malformed_message_is_not_found(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    with pytest.raises(NotFound):
        await store.update_message(USER, "not-an-id", is_read=True)
    session.answers["email"] = []
    with pytest.raises(NotFound):
        await store.update_message(USER, str(EMAIL), is_read=True)
    with pytest.raises(NotFound):
        await store.delete_message(USER, str(EMAIL), permanent=True)
    assert session.writes() == []


async def test_delete_moves_the_message_to_trash_first(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    assert await store.delete_message(USER, str(EMAIL)) is False
    assert session.params("set_email_state") == [
        (TRASH, False, False, USER, EMAIL, INBOX, False, False)]
    assert session.params("add_to_folder_counts") == [(-1, -1, USER, INBOX),
                                                      (1, 1, USER, TRASH)]
    assert "insert_sender" not in session.writes()
    event = only_event(session)
    assert (event.message_deleted.email_id, event.message_deleted.folder_id) == (
        str(EMAIL), INBOX)
    assert not event.message_deleted.permanent
    assert {f.folder_id for f in event.folders} == {INBOX, TRASH}


async def test_permanent_delete_removes_every_row_keeps_the_delivery_and_orphans_blobs(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    session.answers["email"] = [email_row(TRASH)]
    # The attachment's blob is still used by another message; the raw one is not.
    session.answers["any_blob_ref"] = lambda params: (
        [{"owner": "other/attachment/1"}] if params[0] == PHOTO else [])
    assert await store.delete_message(USER, str(EMAIL)) is True
    assert session.writes() == [
        "delete_email_if_unchanged", "delete_listing", "delete_unread", "delete_attachments",
        "delete_thread_member", "delete_message_check", "add_to_folder_counts",
        "set_used_bytes", "delete_blob_ref", "delete_blob_ref", "insert_orphan",
        "insert_event"]
    assert session.params("delete_email_if_unchanged") == [
        (USER, EMAIL, TRASH, False, False)]
    assert session.params("delete_listing") == [(USER, TRASH, EMAIL)]
    assert session.params("delete_thread_member") == [(USER, str(EMAIL), EMAIL)]
    assert session.params("add_to_folder_counts") == [(-1, -1, USER, TRASH)]
    assert session.params("set_used_bytes") == [(200, USER, 500)]
    assert session.params("delete_blob_ref") == [(RAW, f"{EMAIL}/raw"),
                                                 (PHOTO, f"{EMAIL}/attachment/1")]
    orphan = session.row("insert_orphan")
    assert (orphan["shard"], orphan["blob_key"]) == (
        schema.shard_of(RAW, schema.ORPHAN_SHARDS), RAW)
    # The deliveries row stays, so a redelivered job does not resurrect the message.
    assert not any(schema.cql_statements("ks")[name].table == "deliveries"
                   for name in session.writes())
    event = only_event(session)
    assert event.message_deleted.permanent
    assert [f.folder_id for f in event.folders] == [TRASH]


async def test_permanent_delete_that_loses_to_another_change_retries_on_what_it_reads(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    rows = [[email_row()], [email_row(ARCHIVE, is_read=True)]]
    session.answers["email"] = lambda params: rows.pop(0) if len(rows) > 1 else rows[0]
    outcomes = [[{"[applied]": False}], [{"[applied]": True}]]
    session.answers["delete_email_if_unchanged"] = lambda params: outcomes.pop(0)
    assert await store.delete_message(USER, str(EMAIL), permanent=True)
    assert session.params("add_to_folder_counts") == [(-1, 0, USER, ARCHIVE)]
    assert "delete_unread" not in session.writes()
    assert only_event(session).message_deleted.folder_id == ARCHIVE


async def test_delivery_stores_every_field_the_sqlite_adapter_stores(
        store: ScyllaMetadataStore, session: RecordingSession, tmp_path: Path) -> None:
    sqlite_store = await SQLiteMetadataStore.open(tmp_path / "m.db", FAST_HASHER)
    try:
        user = await sqlite_store.create_user("ann@example.test", "pw")
        stored = await sqlite_store.store_delivery(full_delivery(user.user_id))
    finally:
        await sqlite_store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "m.db")) as conn:
        conn.row_factory = sqlite3.Row
        expected = dict(conn.execute("SELECT * FROM emails_by_user").fetchone())
        expected_attachments = [dict(r) for r in conn.execute(
            "SELECT * FROM attachments ORDER BY position")]
        (verdict,) = conn.execute("SELECT verdict FROM message_checks").fetchone()
    created = await store.store_delivery(full_delivery(USER))
    assert created.created
    written = session.row("insert_email")
    assert set(written) == set(expected)
    own = {"user_id", "email_id", "email_key", "folder_id", "thread_id"}
    assert {k: _as_sqlite(v) for k, v in written.items() if k not in own} == \
        {k: v for k, v in expected.items() if k not in own}
    assert (str(written["email_id"]), written["email_key"]) == (
        created.email_id, written["email_id"])
    assert expected["email_id"] == stored.email_id
    attachments = [session.row("insert_attachment", i) for i in range(2)]
    assert [{k: _as_sqlite(v) for k, v in a.items() if k != "email_id"}
            for a in attachments] == [
        {k: v for k, v in a.items() if k != "email_id"} for a in expected_attachments]
    assert session.row("insert_message_check")["verdict"] == bytes(verdict)
    checks = metadata_pb2.StoreDeliveryRequest.FromString(b"").checks
    checks.ParseFromString(bytes(verdict))
    assert checks.spam.score == 7.5 and checks.reason == "spam score"


def _as_sqlite(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def full_delivery(user_id: str) -> metadata_pb2.StoreDeliveryRequest:
    request = metadata_pb2.StoreDeliveryRequest(
        user_id=user_id, delivery_key="job-1:ann", folder_id="spam", blob_key=RAW,
        size=4321, is_read=False)
    request.received_at.FromSeconds(1_700_000_100)
    parsed = request.parsed
    parsed.message_id, parsed.in_reply_to = "<m1@x.org>", "<p@x.org>"
    parsed.references.extend(["<p@x.org>"])
    getattr(parsed, "from").CopyFrom(common_pb2.EmailAddress(name="Ann", email="ann@x.org"))
    parsed.to.add(name="Bob", email="bob@example.test")
    parsed.cc.add(email="carol@example.test")
    parsed.bcc.add(email="dan@example.test")
    parsed.reply_to.add(name="Desk", email="desk@x.org")
    parsed.subject, parsed.text, parsed.html = "Report", "plain", "<p>html</p>"
    parsed.preview = "plain"
    parsed.date.FromSeconds(1_700_000_000)
    parsed.parse_problems.append("bad charset in part 2")
    parsed.attachments.add(filename="r.pdf", content_type="application/pdf", size=10,
                           blob_key=PHOTO, content_id="c1", inline=True)
    parsed.attachments.add(filename="s.pdf", content_type="application/pdf", size=11,
                           blob_key=PHOTO, attachment_id="x")
    checks = request.checks
    checks.authentication_results = "mx.example.test; spf=fail"
    checks.spam.score, checks.spam.threshold = 7.5, 5.0
    checks.spam.rules.add(name="SPF_FAIL", score=3.0, detail="spf=fail")
    checks.reason = "spam score"
    return request


async def test_delivery_claims_its_key_after_the_rows_then_counts_and_unorphans_blobs(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    await store.store_delivery(full_delivery(USER))
    writes = session.writes()
    claim = writes.index("insert_delivery")
    assert {"insert_email", "insert_listing", "insert_unread", "insert_attachment",
            "insert_blob_ref", "insert_thread_member", "insert_message_check"} <= \
        set(writes[:claim])
    assert writes[claim + 1:] == ["delete_orphan", "delete_orphan", "add_to_folder_counts",
                                  "set_used_bytes", "insert_event"]
    assert session.params("delete_orphan") == [
        (schema.shard_of(k, schema.ORPHAN_SHARDS), k) for k in (RAW, PHOTO)]
    assert session.params("add_to_folder_counts") == [(1, 1, USER, SPAM)]
    assert session.params("set_used_bytes") == [(4821, USER, 500)]
    assert session.params("insert_thread_of_message_id") == [
        (USER, m, str(session.row("insert_email")["email_id"]))
        for m in ("m1@x.org", "p@x.org")]


async def test_delivery_that_loses_the_claim_undoes_its_rows_and_returns_the_winner(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    winner = ids.new_timeuuid()
    session.answers["insert_delivery"] = [{"[applied]": False, "user_id": USER,
                                           "delivery_key": "job-1:ann", "email_id": winner,
                                           "created_at": 1.0}]
    stored = await store.store_delivery(full_delivery(USER))
    assert (stored.email_id, stored.created) == (str(winner), False)
    writes = session.writes()
    undone = writes[writes.index("insert_delivery") + 1:]
    assert undone == ["delete_message_check", "delete_thread_member", "delete_blob_ref",
                      "delete_blob_ref", "delete_blob_ref", "delete_attachments",
                      "delete_unread", "delete_listing", "delete_email", "insert_orphan",
                      "insert_orphan"]
    assert {p[1] for p in session.params("insert_orphan")} == {RAW, PHOTO}


async def test_repeated_delivery_is_answered_from_the_deliveries_row(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    first = ids.new_timeuuid()
    session.answers["delivery"] = [{"email_id": first}]
    stored = await store.store_delivery(full_delivery(USER))
    assert (stored.email_id, stored.created) == (str(first), False)
    assert session.writes() == []


async def test_list_users_merges_the_shards_in_user_id_order(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    user_ids = sorted(ids.new_id() for _ in range(40))

    def shard_page(params: tuple[Any, ...]) -> list[dict[str, Any]]:
        shard, after, limit = params
        return [{"user_id": u} for u in user_ids
                if schema.shard_of(u, schema.USER_SHARDS) == shard and u > after][:limit]

    session.answers["user_ids_after"] = shard_page
    seen: list[str] = []
    token = ""
    while True:
        users, token = await store.list_users(page_size=15, page_token=token)
        seen += [u.user_id for u in users]
        if not token:
            break
        assert token == users[-1].user_id
    assert seen == user_ids
    assert {p[0] for p in session.params("user_ids_after")} == set(range(schema.USER_SHARDS))
    with pytest.raises(InvalidArgument):
        await store.list_users(page_size=1001)


async def test_a_new_user_is_listed_in_its_shard(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    session.answers["user"] = lambda params: [user_row(params[0], 0)]
    user = await store.create_user("Ann@Example.Test", "pw")
    assert session.params("insert_user_id") == [
        (schema.shard_of(user.user_id, schema.USER_SHARDS), user.user_id)]
    assert len(session.params("insert_folder")) == len(DEFAULT_FOLDERS)


async def test_orphaned_blobs_are_the_old_ones_of_every_shard_oldest_first(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    orphans = {"1" * 64: 30.0, "2" * 64: 10.0, "3" * 64: 99.0, "4" * 64: 20.0}
    session.answers["orphans_of_shard"] = lambda params: [
        {"blob_key": k, "since": s} for k, s in orphans.items()
        if schema.shard_of(k, schema.ORPHAN_SHARDS) == params[0]]
    assert await store.orphaned_blobs(50.0) == ["2" * 64, "4" * 64, "1" * 64]
    assert await store.orphaned_blobs(50.0, limit=1) == ["2" * 64]
    assert len(session.params("orphans_of_shard")) == 2 * schema.ORPHAN_SHARDS


async def test_claim_orphan_deletes_it_by_an_lwt_on_the_release_time_it_read(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    shard = schema.shard_of(RAW, schema.ORPHAN_SHARDS)
    session.answers["orphan"] = [{"since": 10.0}]
    assert not await store.claim_orphan(RAW, released_before=10.0)  # not old enough
    assert session.params("claim_orphan") == []
    assert await store.claim_orphan(RAW, released_before=60.0)
    assert session.params("claim_orphan") == [(shard, RAW, 10.0)]
    session.answers["claim_orphan"] = [{"[applied]": False, "since": 42.0}]
    assert not await store.claim_orphan(RAW, released_before=60.0)  # another GC won
    session.answers["orphan"] = []
    assert not await store.claim_orphan(RAW, released_before=60.0)


async def test_a_referenced_orphan_is_forgotten_not_claimed(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    session.answers["orphan"] = [{"since": 10.0}]
    session.answers["any_blob_ref"] = [{"owner": f"{EMAIL}/raw"}]
    assert not await store.claim_orphan(RAW, released_before=60.0)
    assert session.params("claim_orphan") == [
        (schema.shard_of(RAW, schema.ORPHAN_SHARDS), RAW, 10.0)]
    await store.note_orphan(RAW)
    assert session.params("insert_orphan") == []


async def test_note_orphan_records_an_unreferenced_blob_at_the_given_time(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    await store.note_orphan(RAW, since=12.5)
    assert session.params("any_blob_ref") == [(RAW, 1)]
    assert session.params("insert_orphan") == [
        (schema.shard_of(RAW, schema.ORPHAN_SHARDS), RAW, 12.5)]


async def test_sender_list_entries_are_stored_lowercased_and_read_back(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    session.answers["sender_lists"] = [
        {"sender": "bob@x.org", "allow": True, "source": "user"},
        {"sender": "spam.test", "allow": False, "source": "feedback"}]
    entries = await store.update_sender_list(
        USER, common_pb2.SenderListEntry(sender=" Bob@X.org ", allow=True))
    written = session.row("insert_sender")
    assert (written["user_id"], written["sender"], written["allow"], written["source"]) == (
        USER, "bob@x.org", True, "user")
    assert [(e.sender, e.allow, e.source) for e in entries] == [
        ("bob@x.org", True, "user"), ("spam.test", False, "feedback")]
    await store.update_sender_list(USER, common_pb2.SenderListEntry(sender="Bob@x.org"),
                                   remove=True)
    assert session.params("delete_sender") == [(USER, "bob@x.org")]
    with pytest.raises(InvalidArgument):
        await store.update_sender_list(USER, common_pb2.SenderListEntry(sender="@x.org"))


async def test_every_page_of_a_result_is_read(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    rows = session.answers["folders"]
    assert isinstance(rows, list)
    session.answers["folders"] = Pages(rows[:2], rows[2:4], rows[4:])
    assert len(await store.list_folders(USER)) == len(DEFAULT_FOLDERS)


async def test_message_reads_back_its_inbound_checks(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    verdict = full_delivery(USER).checks
    session.answers["message_check"] = [{"verdict": verdict.SerializeToString()}]
    message = await store.get_message(USER, str(EMAIL))
    assert message.checks == verdict
    assert [a.blob_key for a in message.attachments] == [PHOTO]


def test_existing_columns_are_read_from_the_driver_table_metadata() -> None:
    from cassandra.metadata import ColumnMetadata, TableMetadataV3

    table = TableMetadataV3("ks", "users")
    for name, cql_type in (("user_id", "text"), ("used_bytes", "bigint")):
        table.columns[name] = ColumnMetadata(table, name, cql_type)
    described = store_scylla.existing_columns({"users": table})
    assert described == {"users": {"user_id": "text", "used_bytes": "bigint"}}
    planned = schema.cql_migration("ks", {"replication_factor": 1}, described)
    assert "ALTER TABLE ks.users ADD address text" in planned
    assert not any(s.startswith(("DROP", "ALTER TABLE ks.users DROP")) for s in planned)


async def test_pending_events_keep_their_seq_until_removed(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    keys = [ids.new_timeuuid() for _ in range(3)]
    outbox = {key: schema.shard_of(f"user-{i}", schema.OUTBOX_SHARDS)
              for i, key in enumerate(keys)}
    session.answers["events_of_shard"] = lambda params: [
        {"shard": shard, "event_key": key, "event_id": str(key), "user_id": "u",
         "payload": b""} for key, shard in outbox.items() if shard == params[0]]
    first = await store.pending_events()
    assert [e.event_id for e in first] == [str(k) for k in keys]  # oldest first
    assert await store.pending_events() == first
    await store.remove_events([first[0].seq])
    assert session.params("delete_event") == [(outbox[keys[0]], keys[0])]
    del outbox[keys[0]]
    assert await store.pending_events() == first[1:]


def test_migrate_runs_only_what_an_existing_keyspace_lacks() -> None:
    from cassandra.metadata import ColumnMetadata, KeyspaceMetadata, TableMetadataV3

    keyspace = KeyspaceMetadata("ks", True, "SimpleStrategy", {"replication_factor": "1"})
    for table in schema.tables_for("scylla"):
        described = TableMetadataV3("ks", table.name)
        for column in table.columns:
            if (table.name, column.name) != ("emails_by_user", "parse_problems_json"):
                described.columns[column.name] = ColumnMetadata(
                    described, column.name, schema.cql_type(column))
        keyspace.tables[table.name] = described
    executed: list[str] = []
    ran = store_scylla.migrate_keyspace("ks", {"replication_factor": 3}, {"ks": keyspace},
                                        executed.append)
    assert ran == executed == ["ALTER TABLE ks.emails_by_user ADD parse_problems_json text"]
    executed.clear()
    keyspace.tables["emails_by_user"].columns["parse_problems_json"] = ColumnMetadata(
        keyspace.tables["emails_by_user"], "parse_problems_json", "text")
    assert store_scylla.migrate_keyspace("ks", {"replication_factor": 3}, {"ks": keyspace},
                                         executed.append) == ["-- keyspace ks is up to date"]
    assert executed == []
    keyspace.tables["users"].columns["used_bytes"] = ColumnMetadata(
        keyspace.tables["users"], "used_bytes", "int")
    with pytest.raises(MailgridError, match=r"cannot migrate: ks\.users\.used_bytes is int"):
        store_scylla.migrate_keyspace("ks", {"replication_factor": 3}, {"ks": keyspace},
                                      executed.append)
    assert executed == []


def test_migrate_creates_a_missing_keyspace_and_every_table() -> None:
    executed: list[str] = []
    store_scylla.migrate_keyspace("ks", {"replication_factor": 3}, {}, executed.append)
    assert executed == schema.cql_schema("ks", {"replication_factor": 3})


def test_mailgrid_migrate_against_an_unreachable_cluster_says_so(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mailgrid import cli

    monkeypatch.setenv("MAILGRID_METADATA_DB_URL", f"scylla://127.0.0.1:{free_port()}/ks")
    assert cli.main(["migrate"]) == 1
    assert "ScyllaDB is unavailable" in capsys.readouterr().err


async def test_a_batch_of_deliveries_gives_each_its_own_outcome(
        store: ScyllaMetadataStore, session: RecordingSession) -> None:
    bad = full_delivery(USER)
    bad.blob_key = "not-a-hash"
    good = full_delivery(USER)
    results = await store.store_deliveries([bad, good])
    assert isinstance(results[0], InvalidArgument)
    assert isinstance(results[1], StoredDelivery) and results[1].created
    assert len(session.params("insert_delivery")) == 1
