"""The MetadataStore contract (metadata_svc.ports.MetadataStore), run against every adapter.

An adapter's test class supplies only the ``store`` fixture (a fresh, empty store) and
inherits every test. The ScyllaDB class runs when MAILGRID_TEST_SCYLLA_HOSTS names a
disposable cluster and says it was skipped otherwise (end of the pytest output).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailgrid import ids
from mailgrid.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unauthenticated,
)
from mailgrid.v1 import common_pb2, events_pb2, metadata_pb2
from metadata_svc import schema
from metadata_svc.ports import MetadataStore, StoredDelivery
from metadata_svc.store_scylla import ScyllaLocation, ScyllaMetadataStore
from metadata_svc.store_scylla import migrate as migrate_scylla
from metadata_svc.store_sqlite import SQLiteMetadataStore
from tests.contract.conftest import note_adapter

ROLES = {
    "Inbox": common_pb2.FOLDER_ROLE_INBOX,
    "Sent": common_pb2.FOLDER_ROLE_SENT,
    "Drafts": common_pb2.FOLDER_ROLE_DRAFTS,
    "Trash": common_pb2.FOLDER_ROLE_TRASH,
    "Spam": common_pb2.FOLDER_ROLE_SPAM,
    "Archive": common_pb2.FOLDER_ROLE_ARCHIVE,
}


def blob_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def delivery(user_id: str, key: str, *, subject: str = "hello", message_id: str = "",
             in_reply_to: str = "", references: tuple[str, ...] = (), size: int = 100,
             folder: str = "", is_read: bool = False, raw: str = "",
             attachments: tuple[str, ...] = ()) -> metadata_pb2.StoreDeliveryRequest:
    """A delivery as the inbound path files it; ``raw`` and ``attachments`` name blobs."""
    request = metadata_pb2.StoreDeliveryRequest(
        user_id=user_id, delivery_key=key, folder_id=folder, blob_key=blob_key(raw or key),
        size=size, is_read=is_read)
    parsed = request.parsed
    parsed.message_id, parsed.in_reply_to, parsed.subject = message_id, in_reply_to, subject
    parsed.references.extend(references)
    parsed.preview = f"preview of {subject}"
    getattr(parsed, "from").CopyFrom(common_pb2.EmailAddress(name="Ann", email="ann@x.org"))
    for name in attachments:
        parsed.attachments.add(filename=f"{name}.pdf", content_type="application/pdf",
                               size=10, blob_key=blob_key(name))
    return request


async def events(store: MetadataStore) -> list[events_pb2.MailEvent]:
    return [events_pb2.MailEvent.FromString(e.payload) for e in await store.pending_events()]


async def clear_events(store: MetadataStore) -> None:
    await store.remove_events([e.seq for e in await store.pending_events(1000)])


async def folder(store: MetadataStore, user_id: str, role: str) -> common_pb2.Folder:
    return await store.get_folder(user_id, role)


class MetadataStoreContract:
    @pytest.fixture
    async def store(self) -> AsyncIterator[MetadataStore]:
        raise NotImplementedError
        yield

    @pytest.fixture
    async def user(self, store: MetadataStore) -> common_pb2.User:
        return await store.create_user("Alice@Example.Test", "correct horse")

    @pytest.fixture
    async def other(self, store: MetadataStore) -> common_pb2.User:
        return await store.create_user("bob@example.test", "battery staple")

    # users

    async def test_new_user_has_lowercased_address_and_rfc6154_folders(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        assert user.address == "alice@example.test"
        assert user.user_id and user.used_bytes == 0 and user.quota_bytes == 0
        folders = await store.list_folders(user.user_id)
        assert {f.name: f.role for f in folders} == ROLES
        assert [f.name for f in folders] == list(ROLES)
        assert all(f.total == 0 and f.unread == 0 for f in folders)
        assert len({f.folder_id for f in folders}) == 6

    async def test_taken_address_in_any_case_is_already_exists(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        with pytest.raises(AlreadyExists):
            await store.create_user("ALICE@example.test", "other")

    @pytest.mark.parametrize("address", ["", "no-at-sign", "@example.test", "a b@x.test"])
    async def test_malformed_address_is_invalid_argument(
            self, store: MetadataStore, address: str) -> None:
        with pytest.raises(InvalidArgument):
            await store.create_user(address, "pw")

    async def test_empty_password_is_invalid_argument(self, store: MetadataStore) -> None:
        with pytest.raises(InvalidArgument):
            await store.create_user("carol@example.test", "")

    async def test_user_is_found_by_id_and_by_address_in_any_case(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        assert await store.get_user(user.user_id) == user
        assert await store.get_user_by_address("ALICE@example.TEST") == user

    async def test_unknown_user_is_not_found(self, store: MetadataStore) -> None:
        with pytest.raises(NotFound):
            await store.get_user("no-such-user")
        with pytest.raises(NotFound):
            await store.get_user_by_address("nobody@example.test")
        with pytest.raises(NotFound):
            await store.list_folders("no-such-user")

    async def test_authenticate_with_the_right_password_returns_the_user(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        assert await store.authenticate("alice@EXAMPLE.test", "correct horse") == user

    async def test_wrong_password_and_unknown_user_get_the_same_answer(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        with pytest.raises(Unauthenticated) as wrong:
            await store.authenticate(user.address, "wrong")
        with pytest.raises(Unauthenticated) as unknown:
            await store.authenticate("nobody@example.test", "correct horse")
        assert wrong.value.detail == unknown.value.detail

    # listing

    async def test_folder_counts_follow_deliveries(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        await store.store_delivery(delivery(user.user_id, "d1"))
        await store.store_delivery(delivery(user.user_id, "d2", is_read=True))
        await store.store_delivery(delivery(user.user_id, "d3", folder="spam"))
        counts = {f.name: (f.total, f.unread) for f in await store.list_folders(user.user_id)}
        assert counts["Inbox"] == (2, 1)
        assert counts["Spam"] == (1, 1)
        assert counts["Sent"] == (0, 0)

    async def test_messages_are_listed_newest_first_page_by_page(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = [(await store.store_delivery(delivery(user.user_id, f"d{i}"))).email_id
                  for i in range(7)]
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await store.list_messages(user.user_id, "inbox", page_size=3,
                                             page_token=token)
            seen += [m.email_id for m in page.messages]
            pages += 1
            if not page.next_page_token:
                break
            assert page.next_page_token == page.messages[-1].email_id
            token = page.next_page_token
        assert seen == stored[::-1]
        assert pages == 3

    async def test_a_full_last_page_has_no_next_token(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        for i in range(2):
            await store.store_delivery(delivery(user.user_id, f"d{i}"))
        page = await store.list_messages(user.user_id, "inbox", page_size=2)
        assert len(page.messages) == 2
        assert page.next_page_token == ""

    async def test_default_page_size_is_50(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        for i in range(51):
            await store.store_delivery(delivery(user.user_id, f"d{i}"))
        page = await store.list_messages(user.user_id, "inbox")
        assert len(page.messages) == 50
        assert page.next_page_token

    @pytest.mark.parametrize("size", [-1, 201])
    async def test_page_size_out_of_range_is_invalid_argument(
            self, store: MetadataStore, user: common_pb2.User, size: int) -> None:
        with pytest.raises(InvalidArgument):
            await store.list_messages(user.user_id, "inbox", page_size=size)

    @pytest.mark.parametrize("token", ["garbage", "6f1c0f3e-0000-4000-8000-000000000000"])
    async def test_bad_page_token_is_invalid_argument(
            self, store: MetadataStore, user: common_pb2.User, token: str) -> None:
        with pytest.raises(InvalidArgument):
            await store.list_messages(user.user_id, "inbox", page_token=token)

    async def test_folder_is_named_by_id_or_role(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        inbox = await folder(store, user.user_id, "INBOX")
        assert inbox.role == common_pb2.FOLDER_ROLE_INBOX
        by_id = await store.list_messages(user.user_id, inbox.folder_id)
        assert [m.email_id for m in by_id.messages] == [stored.email_id]
        assert by_id.messages[0].folder_id == inbox.folder_id

    async def test_unknown_folder_is_not_found(
            self, store: MetadataStore, user: common_pb2.User, other: common_pb2.User
            ) -> None:
        with pytest.raises(NotFound):
            await store.list_messages(user.user_id, "junkyard")
        others_inbox = await folder(store, other.user_id, "inbox")
        with pytest.raises(NotFound):
            await store.list_messages(user.user_id, others_inbox.folder_id)

    async def test_unread_only_lists_unread_and_follows_flag_changes(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        first = await store.store_delivery(delivery(user.user_id, "d1"))
        await store.store_delivery(delivery(user.user_id, "d2", is_read=True))
        third = await store.store_delivery(delivery(user.user_id, "d3"))

        async def unread() -> list[str]:
            page = await store.list_messages(user.user_id, "inbox", unread_only=True)
            assert all(not m.is_read for m in page.messages)
            return [m.email_id for m in page.messages]

        assert await unread() == [third.email_id, first.email_id]
        await store.update_message(user.user_id, third.email_id, is_read=True)
        assert await unread() == [first.email_id]
        await store.update_message(user.user_id, third.email_id, is_read=False)
        assert await unread() == [third.email_id, first.email_id]
        assert (await folder(store, user.user_id, "inbox")).unread == 2

    # reading one message

    async def test_stored_message_reads_back_whole(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        request = delivery(user.user_id, "d1", subject="Report", message_id="<m1@x.org>",
                           references=("<r0@x.org>",), in_reply_to="<r0@x.org>",
                           attachments=("report", "photo"), size=4321)
        parsed = request.parsed
        parsed.to.add(name="Alice", email="alice@example.test")
        parsed.cc.add(email="carol@example.test")
        parsed.reply_to.add(name="Ann's desk", email="desk@x.org")
        parsed.text, parsed.html = "plain body", "<p>html body</p>"
        parsed.date.FromSeconds(1_700_000_000)
        parsed.parse_problems.append("bad charset in part 2")
        request.received_at.FromSeconds(1_700_000_100)
        stored = await store.store_delivery(request)
        message = await store.get_message(user.user_id, stored.email_id)
        assert message.email_id == stored.email_id
        assert message.folder_id == (await folder(store, user.user_id, "inbox")).folder_id
        assert message.message_id == "m1@x.org"
        assert message.in_reply_to == "r0@x.org"
        assert list(message.references) == ["r0@x.org"]
        assert getattr(message, "from").email == "ann@x.org"
        assert [(a.name, a.email) for a in message.to] == [("Alice", "alice@example.test")]
        assert [a.email for a in message.cc] == ["carol@example.test"]
        assert [a.name for a in message.reply_to] == ["Ann's desk"]
        assert (message.subject, message.text, message.html) == (
            "Report", "plain body", "<p>html body</p>")
        assert message.date.seconds == 1_700_000_000
        assert message.received_at.seconds == 1_700_000_100
        assert message.size == 4321 and message.blob_key == blob_key("d1")
        assert list(message.parse_problems) == ["bad charset in part 2"]
        assert [a.filename for a in message.attachments] == ["report.pdf", "photo.pdf"]
        assert message.attachments[0].blob_key == blob_key("report")
        assert len({a.attachment_id for a in message.attachments}) == 2
        summary = (await store.list_messages(user.user_id, "inbox")).messages[0]
        assert summary.has_attachments and summary.subject == "Report"
        assert summary.date.seconds == 1_700_000_000

    async def test_missing_date_falls_back_to_arrival_time(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        request = delivery(user.user_id, "d1")
        request.received_at.FromSeconds(1_600_000_000)
        stored = await store.store_delivery(request)
        message = await store.get_message(user.user_id, stored.email_id)
        assert message.date.seconds == 1_600_000_000

    async def test_another_users_message_is_not_found(
            self, store: MetadataStore, user: common_pb2.User, other: common_pb2.User
            ) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        with pytest.raises(NotFound) as caught:
            await store.get_message(other.user_id, stored.email_id)
        with pytest.raises(NotFound):
            await store.update_message(other.user_id, stored.email_id, is_read=True)
        with pytest.raises(NotFound):
            await store.delete_message(other.user_id, stored.email_id, permanent=True)
        assert (await store.list_messages(other.user_id, "inbox")).messages == []
        assert await store.get_message(user.user_id, stored.email_id)
        with pytest.raises(NotFound) as missing:
            await store.get_message(other.user_id, str(ids.new_timeuuid()))
        assert type(caught.value) is type(missing.value)

    @pytest.mark.parametrize("email_id", ["", "x", "../etc", "6f1c0f3e-0000-4000-8000-0000"])
    async def test_malformed_email_id_is_not_found(
            self, store: MetadataStore, user: common_pb2.User, email_id: str) -> None:
        with pytest.raises(NotFound):
            await store.get_message(user.user_id, email_id)

    # changing

    async def test_flags_change_and_counts_follow(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        summary = await store.update_message(user.user_id, stored.email_id, is_read=True,
                                             is_starred=True)
        assert summary.is_read and summary.is_starred
        message = await store.get_message(user.user_id, stored.email_id)
        assert message.is_read and message.is_starred
        listed = (await store.list_messages(user.user_id, "inbox")).messages[0]
        assert listed.is_read and listed.is_starred
        inbox = await folder(store, user.user_id, "inbox")
        assert (inbox.total, inbox.unread) == (1, 0)

    async def test_move_changes_folder_and_counts(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        archive = await folder(store, user.user_id, "archive")
        summary = await store.update_message(user.user_id, stored.email_id,
                                             folder=archive.folder_id)
        assert summary.folder_id == archive.folder_id
        assert (await store.list_messages(user.user_id, "inbox")).messages == []
        moved = await store.list_messages(user.user_id, "archive", unread_only=True)
        assert [m.email_id for m in moved.messages] == [stored.email_id]
        counts = {f.name: (f.total, f.unread) for f in await store.list_folders(user.user_id)}
        assert counts["Inbox"] == (0, 0) and counts["Archive"] == (1, 1)

    async def test_move_to_unknown_folder_is_not_found(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        with pytest.raises(NotFound):
            await store.update_message(user.user_id, stored.email_id, folder="nowhere")

    async def test_delete_moves_to_trash_then_deletes_for_good(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1", size=500))
        assert await store.delete_message(user.user_id, stored.email_id) is False
        trash = await folder(store, user.user_id, "trash")
        assert (trash.total, trash.unread) == (1, 1)
        assert (await store.get_message(user.user_id, stored.email_id)).folder_id == \
            trash.folder_id
        assert await store.delete_message(user.user_id, stored.email_id) is True
        with pytest.raises(NotFound):
            await store.get_message(user.user_id, stored.email_id)
        counts = {f.name: (f.total, f.unread) for f in await store.list_folders(user.user_id)}
        assert counts["Trash"] == (0, 0) and counts["Inbox"] == (0, 0)
        assert (await store.get_user(user.user_id)).used_bytes == 0

    async def test_permanent_delete_skips_trash(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        assert await store.delete_message(user.user_id, stored.email_id, permanent=True)
        assert (await folder(store, user.user_id, "trash")).total == 0
        assert (await store.list_messages(user.user_id, "inbox", unread_only=True)).messages \
            == []

    # delivery

    async def test_repeated_delivery_returns_the_first_email_and_changes_nothing(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        first = await store.store_delivery(delivery(user.user_id, "job-1:alice"))
        await clear_events(store)
        again = await store.store_delivery(delivery(user.user_id, "job-1:alice",
                                                    subject="changed"))
        assert again.email_id == first.email_id
        assert (first.created, again.created) == (True, False)
        assert (await folder(store, user.user_id, "inbox")).total == 1
        assert (await store.get_user(user.user_id)).used_bytes == 100
        assert await events(store) == []

    async def test_delivery_key_remembers_its_email_even_after_deletion(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        assert await store.delivered_email_id(user.user_id, "job-1") is None
        stored = await store.store_delivery(delivery(user.user_id, "job-1"))
        assert await store.delivered_email_id(user.user_id, "job-1") == stored.email_id
        await store.delete_message(user.user_id, stored.email_id, permanent=True)
        again = await store.store_delivery(delivery(user.user_id, "job-1"))
        assert (again.email_id, again.created) == (stored.email_id, False)
        assert (await folder(store, user.user_id, "inbox")).total == 0

    async def test_a_batch_files_each_delivery_and_a_refused_one_changes_nothing(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        small = await store.create_user("tiny@example.test", "pw", quota_bytes=150)
        results = await store.store_deliveries([
            delivery(user.user_id, "job-b:1", subject="one"),
            delivery(small.user_id, "job-b:2", size=100),
            delivery(small.user_id, "job-b:3", size=100),    # would pass the quota
            delivery(user.user_id, "job-b:1", subject="one"),  # a repeat in the batch
            delivery("", "job-b:4"),                           # no user id
        ])
        first, second, over, repeat, invalid = results
        assert isinstance(first, StoredDelivery) and first.created
        assert isinstance(second, StoredDelivery) and second.created
        assert isinstance(over, QuotaExceeded)
        assert isinstance(repeat, StoredDelivery)
        assert (repeat.email_id, repeat.created) == (first.email_id, False)
        assert isinstance(invalid, InvalidArgument)
        assert (await folder(store, user.user_id, "inbox")).total == 1
        assert (await folder(store, small.user_id, "inbox")).total == 1
        assert (await store.get_user(small.user_id)).used_bytes == 100
        assert await store.delivered_email_id(small.user_id, "job-b:3") is None

    async def test_get_messages_answers_each_and_none_for_missing_or_foreign(
            self, store: MetadataStore, user: common_pb2.User, other: common_pb2.User
            ) -> None:
        mine = await store.store_delivery(delivery(user.user_id, "job-g:1", subject="mine"))
        theirs = await store.store_delivery(delivery(other.user_id, "job-g:2"))
        found = await store.get_messages([
            (user.user_id, mine.email_id), (user.user_id, theirs.email_id),
            (user.user_id, "not-an-id"), (other.user_id, theirs.email_id)])
        assert [m.email_id if m else None for m in found] == [
            mine.email_id, None, None, theirs.email_id]
        assert found[0] is not None and found[0].subject == "mine"

    async def test_bodies_are_kept_or_left_to_the_raw_message_as_asked(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        kept = delivery(user.user_id, "job-b:1")
        kept.parsed.text, kept.parsed.html = "the text", "<p>the html</p>"
        from_raw = delivery(user.user_id, "job-b:2")
        from_raw.parsed.bodies_from_raw = True
        first, second = await store.store_deliveries([kept, from_raw])
        assert isinstance(first, StoredDelivery) and isinstance(second, StoredDelivery)
        one = await store.get_message(user.user_id, first.email_id)
        assert (one.text, one.html, one.bodies_from_raw) == (
            "the text", "<p>the html</p>", False)
        (two,) = await store.get_messages([(user.user_id, second.email_id)])
        assert two is not None and (two.text, two.html, two.bodies_from_raw) == (
            "", "", True)

    async def test_delivery_key_is_scoped_per_user(
            self, store: MetadataStore, user: common_pb2.User, other: common_pb2.User
            ) -> None:
        a = await store.store_delivery(delivery(user.user_id, "job-1"))
        b = await store.store_delivery(delivery(other.user_id, "job-1"))
        assert a.created and b.created and a.email_id != b.email_id

    async def test_delivery_to_unknown_user_is_not_found(self, store: MetadataStore) -> None:
        with pytest.raises(NotFound):
            await store.store_delivery(delivery("no-such-user", "d1"))

    async def test_delivery_with_bad_blob_key_is_invalid_argument(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        request = delivery(user.user_id, "d1")
        request.blob_key = "not-a-hash"
        with pytest.raises(InvalidArgument):
            await store.store_delivery(request)
        with pytest.raises(InvalidArgument):
            await store.store_delivery(delivery(user.user_id, ""))

    # threads

    async def test_reply_joins_the_parents_thread_and_strangers_do_not(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        uid = user.user_id
        parent = await store.store_delivery(delivery(uid, "d1", message_id="<p@x.org>"))
        reply = await store.store_delivery(delivery(
            uid, "d2", message_id="<r@y.org>", in_reply_to="<p@x.org>",
            references=("<p@x.org>",)))
        deep = await store.store_delivery(delivery(
            uid, "d3", message_id="<d@z.org>", references=("<p@x.org>", "<r@y.org>")))
        stranger = await store.store_delivery(delivery(uid, "d4", message_id="<s@x.org>"))
        loner = await store.store_delivery(delivery(uid, "d5"))
        threads = [(await store.get_message(uid, m.email_id)).thread_id
                   for m in (parent, reply, deep, stranger, loner)]
        assert threads[0] == threads[1] == threads[2]
        assert len({threads[0], threads[3], threads[4]}) == 3

    async def test_parent_arriving_after_its_reply_joins_the_thread(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        uid = user.user_id
        reply = await store.store_delivery(delivery(
            uid, "d1", message_id="<r@y.org>", in_reply_to="<p@x.org>"))
        parent = await store.store_delivery(delivery(uid, "d2", message_id="<p@x.org>"))
        assert (await store.get_message(uid, reply.email_id)).thread_id == \
            (await store.get_message(uid, parent.email_id)).thread_id

    async def test_threads_are_per_user(
            self, store: MetadataStore, user: common_pb2.User, other: common_pb2.User
            ) -> None:
        a = await store.store_delivery(delivery(user.user_id, "d1", message_id="<p@x.org>"))
        b = await store.store_delivery(delivery(other.user_id, "d1", in_reply_to="<p@x.org>"))
        assert (await store.get_message(user.user_id, a.email_id)).thread_id != \
            (await store.get_message(other.user_id, b.email_id)).thread_id

    # quota

    async def test_used_bytes_follow_store_and_permanent_delete(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        a = await store.store_delivery(delivery(user.user_id, "d1", size=300))
        await store.store_delivery(delivery(user.user_id, "d2", size=200))
        assert (await store.get_user(user.user_id)).used_bytes == 500
        await store.delete_message(user.user_id, a.email_id)  # to Trash: still stored
        assert (await store.get_user(user.user_id)).used_bytes == 500
        await store.delete_message(user.user_id, a.email_id)
        assert (await store.get_user(user.user_id)).used_bytes == 200

    async def test_delivery_past_the_quota_is_quota_exceeded(
            self, store: MetadataStore) -> None:
        user = await store.create_user("small@example.test", "pw", quota_bytes=1000)
        await store.store_delivery(delivery(user.user_id, "d1", size=600))
        with pytest.raises(QuotaExceeded):
            await store.store_delivery(delivery(user.user_id, "d2", size=600))
        await store.store_delivery(delivery(user.user_id, "d3", size=400))
        assert (await store.get_user(user.user_id)).used_bytes == 1000

    async def test_zero_quota_is_unlimited(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        await store.store_delivery(delivery(user.user_id, "d1", size=10**12))
        assert (await store.get_user(user.user_id)).used_bytes == 10**12

    # blob references

    async def test_shared_raw_blob_is_released_with_its_last_reference(
            self, store: MetadataStore, user: common_pb2.User, other: common_pb2.User
            ) -> None:
        a = await store.store_delivery(delivery(user.user_id, "a", raw="shared"))
        b = await store.store_delivery(delivery(other.user_id, "b", raw="shared"))
        later = time.time() + 60
        await store.delete_message(user.user_id, a.email_id, permanent=True)
        assert await store.orphaned_blobs(later) == []
        await store.delete_message(other.user_id, b.email_id, permanent=True)
        assert await store.orphaned_blobs(later) == [blob_key("shared")]

    async def test_identical_attachments_are_released_with_the_last_message(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        a = await store.store_delivery(delivery(user.user_id, "a", attachments=("same",)))
        b = await store.store_delivery(delivery(user.user_id, "b",
                                                attachments=("same", "same")))
        later = time.time() + 60
        await store.delete_message(user.user_id, a.email_id, permanent=True)
        assert set(await store.orphaned_blobs(later)) == {blob_key("a")}
        await store.delete_message(user.user_id, b.email_id, permanent=True)
        assert set(await store.orphaned_blobs(later)) == {
            blob_key("a"), blob_key("b"), blob_key("same")}

    async def test_orphan_is_claimed_only_when_old_enough_and_unreferenced(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        a = await store.store_delivery(delivery(user.user_id, "a", raw="r"))
        await store.delete_message(user.user_id, a.email_id, permanent=True)
        assert not await store.claim_orphan(blob_key("r"), released_before=0)
        assert await store.claim_orphan(blob_key("r"), released_before=time.time() + 60)
        assert await store.orphaned_blobs(time.time() + 60) == []

    async def test_orphan_that_is_referenced_again_is_not_claimed(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        a = await store.store_delivery(delivery(user.user_id, "a", raw="r"))
        await store.delete_message(user.user_id, a.email_id, permanent=True)
        await store.note_orphan(blob_key("r"))
        await store.store_delivery(delivery(user.user_id, "b", raw="r"))
        await store.note_orphan(blob_key("r"))
        assert not await store.claim_orphan(blob_key("r"), released_before=time.time() + 60)
        assert await store.orphaned_blobs(time.time() + 60) == []

    # events

    async def test_each_change_records_its_event_in_order(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        uid = user.user_id
        stored = await store.store_delivery(delivery(uid, "d1"))
        inbox = await folder(store, uid, "inbox")
        archive = await folder(store, uid, "archive")
        await store.update_message(uid, stored.email_id, is_starred=True)
        await store.update_message(uid, stored.email_id, folder="archive")
        await store.delete_message(uid, stored.email_id)
        await store.delete_message(uid, stored.email_id)
        recorded = await events(store)
        assert [e.WhichOneof("kind") for e in recorded] == [
            "message_added", "message_updated", "message_updated", "message_deleted",
            "message_deleted"]
        assert all(e.user_id == uid and e.time.seconds for e in recorded)
        added, starred, moved, trashed, gone = recorded
        assert added.message_added.message.email_id == stored.email_id
        assert [(f.folder_id, f.total, f.unread) for f in added.folders] == [
            (inbox.folder_id, 1, 1)]
        assert starred.message_updated.message.is_starred
        assert list(starred.folders) == []  # no count changed
        assert moved.message_updated.previous_folder_id == inbox.folder_id
        assert moved.message_updated.message.folder_id == archive.folder_id
        assert {(f.name, f.total) for f in moved.folders} == {("Inbox", 0), ("Archive", 1)}
        assert not trashed.message_deleted.permanent
        assert trashed.message_deleted.folder_id == archive.folder_id
        assert {(f.name, f.total) for f in trashed.folders} == {("Archive", 0), ("Trash", 1)}
        assert gone.message_deleted.permanent
        assert {(f.name, f.total) for f in gone.folders} == {("Trash", 0)}

    async def test_a_change_that_changes_nothing_records_no_event(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        await clear_events(store)
        await store.update_message(user.user_id, stored.email_id, is_read=False,
                                   folder="inbox")
        assert await events(store) == []

    # listing users

    async def test_users_are_listed_in_id_order_page_by_page(
            self, store: MetadataStore) -> None:
        created = sorted([(await store.create_user(f"u{i}@example.test", "pw")).user_id
                          for i in range(5)])
        seen: list[str] = []
        token = ""
        while True:
            users, token = await store.list_users(page_size=2, page_token=token)
            seen += [u.user_id for u in users]
            if not token:
                break
            assert token == users[-1].user_id
        assert seen == created
        users, token = await store.list_users()
        assert [u.user_id for u in users] == created and token == ""
        with pytest.raises(InvalidArgument):
            await store.list_users(page_size=1001)

    # sender lists and spam feedback

    async def test_sender_list_entries_are_set_replaced_and_removed(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        uid = user.user_id
        assert await store.sender_lists(uid) == []
        await store.update_sender_list(uid, common_pb2.SenderListEntry(
            sender="Spam.Test", allow=False))
        entries = await store.update_sender_list(uid, common_pb2.SenderListEntry(
            sender=" Bob@X.org ", allow=True))
        assert [(e.sender, e.allow, e.source) for e in entries] == [
            ("bob@x.org", True, "user"), ("spam.test", False, "user")]
        entries = await store.update_sender_list(uid, common_pb2.SenderListEntry(
            sender="bob@x.org", allow=False))
        assert [(e.sender, e.allow) for e in entries] == [
            ("bob@x.org", False), ("spam.test", False)]
        entries = await store.update_sender_list(
            uid, common_pb2.SenderListEntry(sender="BOB@x.org"), remove=True)
        assert [e.sender for e in entries] == ["spam.test"]
        assert await store.sender_lists(uid) == entries
        with pytest.raises(InvalidArgument):
            await store.update_sender_list(uid, common_pb2.SenderListEntry(sender="@x.org"))
        with pytest.raises(NotFound):
            await store.sender_lists("no-such-user")

    async def test_moves_into_and_out_of_spam_feed_the_sender_list(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        uid = user.user_id
        stored = await store.store_delivery(delivery(uid, "d1"))
        await store.update_message(uid, stored.email_id, folder="spam")
        assert [(e.sender, e.allow, e.source) for e in await store.sender_lists(uid)] == [
            ("ann@x.org", False, "feedback")]
        await store.update_message(uid, stored.email_id, folder="inbox")
        assert [(e.sender, e.allow) for e in await store.sender_lists(uid)] == [
            ("ann@x.org", True)]
        await store.update_message(uid, stored.email_id, folder="spam")
        await store.delete_message(uid, stored.email_id)  # to Trash: no verdict
        assert [(e.sender, e.allow) for e in await store.sender_lists(uid)] == [
            ("ann@x.org", False)]

    # inbound checks

    async def test_inbound_checks_are_kept_with_the_message(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        request = delivery(user.user_id, "d1", folder="spam")
        request.checks.authentication_results = "mx.example.test; spf=fail"
        request.checks.spam.score, request.checks.spam.threshold = 7.5, 5.0
        request.checks.spam.rules.add(name="SPF_FAIL", score=3.0, detail="spf=fail")
        request.checks.reason = "spam score 7.5 >= 5.0"
        stored = await store.store_delivery(request)
        message = await store.get_message(user.user_id, stored.email_id)
        assert message.checks == request.checks
        plain = await store.store_delivery(delivery(user.user_id, "d2"))
        assert not (await store.get_message(user.user_id, plain.email_id)).HasField("checks")

    async def test_removed_events_are_not_pending_and_ids_are_unique(
            self, store: MetadataStore, user: common_pb2.User) -> None:
        for i in range(3):
            await store.store_delivery(delivery(user.user_id, f"d{i}"))
        pending = await store.pending_events()
        assert len({e.event_id for e in pending}) == 3
        assert [e.seq for e in pending] == sorted(e.seq for e in pending)
        await store.remove_events([pending[0].seq])
        assert [e.seq for e in await store.pending_events()] == [e.seq for e in pending[1:]]


# Cheap argon2 parameters keep the suite fast; the hash format is the same.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class TestSQLiteMetadataStore(MetadataStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[MetadataStore]:
        store = await SQLiteMetadataStore.open(tmp_path / "meta" / "metadata.db", FAST_HASHER)
        yield store
        await store.close()

    async def test_changes_survive_reopening(self, tmp_path: Path) -> None:
        path = tmp_path / "metadata.db"
        store = await SQLiteMetadataStore.open(path, FAST_HASHER)
        user = await store.create_user("dana@example.test", "pw")
        stored = await store.store_delivery(delivery(user.user_id, "d1"))
        await store.close()
        reopened = await SQLiteMetadataStore.open(path, FAST_HASHER)
        try:
            assert (await reopened.get_message(user.user_id, stored.email_id)).subject == \
                "hello"
            assert await reopened.authenticate("dana@example.test", "pw") == \
                await reopened.get_user(user.user_id)
        finally:
            await reopened.close()

    async def test_a_database_from_before_bodies_from_raw_gets_the_column(
            self, tmp_path: Path) -> None:
        path = tmp_path / "metadata.db"
        store = await SQLiteMetadataStore.open(path, FAST_HASHER)
        user = await store.create_user("old@example.test", "pw")
        request = delivery(user.user_id, "d1")
        request.parsed.text = "kept in the row"
        stored = await store.store_delivery(request)
        await store.close()
        with contextlib.closing(sqlite3.connect(path)) as conn:  # as schema version 1 was
            conn.execute("ALTER TABLE emails_by_user DROP COLUMN bodies_from_raw")
            conn.execute("PRAGMA user_version=1")
        reopened = await SQLiteMetadataStore.open(path, FAST_HASHER)
        try:
            old = await reopened.get_message(user.user_id, stored.email_id)
            assert (old.text, old.bodies_from_raw) == ("kept in the row", False)
            new = delivery(user.user_id, "d2")
            new.parsed.bodies_from_raw = True
            added = await reopened.store_delivery(new)
            assert (await reopened.get_message(user.user_id, added.email_id)).bodies_from_raw
        finally:
            await reopened.close()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (2,)

    async def test_a_batch_journals_its_savepoints_in_memory(self, tmp_path: Path) -> None:
        store = await SQLiteMetadataStore.open(tmp_path / "m.db", FAST_HASHER)
        try:
            user = await store.create_user("fay@example.test", "pw")
            stored = await store.store_deliveries(
                [delivery(user.user_id, f"d{n}") for n in range(40)])
            assert len(stored) == 40
            # 2 = MEMORY: the savepoints' sub-journal is no temp file in /var/tmp.
            assert store._wconn is not None
            assert store._wconn.execute("PRAGMA temp_store").fetchone()[0] == 2
        finally:
            await store.close()

    async def test_passwords_are_stored_as_argon2id_hashes(self, tmp_path: Path) -> None:
        store = await SQLiteMetadataStore.open(tmp_path / "m.db", FAST_HASHER)
        try:
            await store.create_user("erin@example.test", "secret-pw")
        finally:
            await store.close()
        with contextlib.closing(sqlite3.connect(tmp_path / "m.db")) as conn:
            (stored,) = conn.execute("SELECT password_hash FROM users_by_address").fetchone()
        assert stored.startswith("$argon2id$")
        assert "secret-pw" not in stored


def _scylla_hosts() -> str:
    hosts = os.environ.get("MAILGRID_TEST_SCYLLA_HOSTS", "")
    if not hosts:
        reason = ("ScyllaDB adapter NOT tested: MAILGRID_TEST_SCYLLA_HOSTS is unset "
                  "(HOST[:PORT],... of a disposable cluster; no CQL server runs here)")
        note_adapter("metadata", reason)
        pytest.skip(reason)
    try:
        import cassandra  # noqa: F401
    except ImportError:
        reason = "ScyllaDB adapter NOT tested: scylla-driver missing (pip install .[scylla])"
        note_adapter("metadata", reason)
        pytest.skip(reason)
    return hosts


@pytest.fixture(scope="session")
def scylla_keyspace() -> Iterator[ScyllaLocation]:
    """A disposable keyspace (replication 1) on the cluster MAILGRID_TEST_SCYLLA_HOSTS names,
    created with `mailgrid migrate`'s code and dropped at the end."""
    hosts = _scylla_hosts()
    location = ScyllaLocation.from_url(
        f"scylla://{hosts}/mailgrid_test_{secrets.token_hex(4)}")
    asyncio.run(migrate_scylla(location, {"replication_factor": 1}))
    note_adapter("metadata", f"ScyllaDB adapter tested against {hosts} "
                             f"(keyspace {location.keyspace})")
    yield location
    _cql(location, [f"DROP KEYSPACE IF EXISTS {location.keyspace}"])


def _cql(location: ScyllaLocation, statements: list[str]) -> None:
    from cassandra.cluster import Cluster

    cluster = Cluster(list(location.hosts), port=location.port)
    try:
        session = cluster.connect()
        for cql in statements:
            session.execute(cql)
    finally:
        cluster.shutdown()


class TestScyllaMetadataStore(MetadataStoreContract):
    @pytest.fixture
    async def store(self, scylla_keyspace: ScyllaLocation) -> AsyncIterator[MetadataStore]:
        await asyncio.to_thread(_cql, scylla_keyspace, [
            schema.cql_truncate(t, scylla_keyspace.keyspace)
            for t in schema.tables_for("scylla")])
        store = await ScyllaMetadataStore.open(scylla_keyspace, "ONE", FAST_HASHER)
        yield store
        await store.close()
