"""The SearchIndex contract (search_svc.ports.SearchIndex), run against every adapter.

An adapter's class supplies the ``index`` fixture (a fresh, empty index) and the
``exact_field_phrases`` capability; every test is inherited. The embedded tantivy index
always runs; Meilisearch runs whenever a server is available (tests/contract/conftest.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgrid import ids
from mailgrid.errors import InvalidArgument
from mailgrid.v1 import common_pb2
from search_svc import index_tantivy, query
from search_svc.index_meili import MeiliIndex, parse_url
from search_svc.index_tantivy import TantivyIndex
from search_svc.ports import (
    Delete,
    DeleteUser,
    IndexedMessage,
    Order,
    SearchIndex,
    SearchPage,
    UpdateSummary,
    Upsert,
)
from search_svc.snippets import fold

ALICE, BOB = "user-alice", "user-bob"
INBOX, ARCHIVE, TRASH = "folder-inbox", "folder-archive", "folder-trash"
NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)


def message(user: str = ALICE, subject: str = "Quarterly report", body: str = "",
            *, sender: tuple[str, str] = ("Carol Jones", "carol@remote.test"),
            to: tuple[str, ...] = ("Alice Smith <alice@example.test>",),
            cc: tuple[str, ...] = (), bcc: tuple[str, ...] = (),
            filenames: tuple[str, ...] = (), folder: str = INBOX, read: bool = False,
            starred: bool = False, date: str = "2024-03-10T12:00:00", size: int = 2000
            ) -> IndexedMessage:
    summary = common_pb2.MessageSummary(
        email_id=str(ids.new_timeuuid()), folder_id=folder, subject=subject,
        preview=body[:40], is_read=read, is_starred=starred,
        has_attachments=bool(filenames), size=size, thread_id="t")
    getattr(summary, "from").CopyFrom(common_pb2.EmailAddress(name=sender[0],
                                                               email=sender[1]))
    summary.date.FromDatetime(datetime.fromisoformat(date).replace(tzinfo=UTC))
    return IndexedMessage(user, summary, to=to, cc=cc, bcc=bcc, body=body,
                          filenames=filenames)


def with_summary(m: IndexedMessage, **changes: object) -> common_pb2.MessageSummary:
    summary = common_pb2.MessageSummary()
    summary.CopyFrom(m.summary)
    for name, value in changes.items():
        setattr(summary, name, value)
    return summary


async def add(index: SearchIndex, *messages: IndexedMessage, seq: int = 1) -> None:
    await index.apply([Upsert(m) for m in messages], seq)


async def found(index: SearchIndex, text: str, user: str = ALICE,
                folders: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """Email ids of every match (all pages) of ``text`` for ``user``."""
    return {h.summary.email_id for page in await pages(index, text, user, folders=folders)
            for h in page.hits}


async def pages(index: SearchIndex, text: str, user: str = ALICE, *, size: int = 100,
                order: Order = Order.NEWEST,
                folders: dict[str, tuple[str, ...]] | None = None) -> list[SearchPage]:
    node = query.parse(text, now=NOW)
    mapping = folders or {"inbox": (INBOX,), "archive": (ARCHIVE,)}
    node = query.map_in(node, lambda n: query.with_folders(
        n, mapping.get(n.name.lower(), ())))
    result = [await index.search(user, node, order=order, page_size=size)]
    while result[-1].next_page_token:
        result.append(await index.search(user, node, order=order, page_size=size,
                                         page_token=result[-1].next_page_token))
        assert len(result) < 100
    return result


def email_ids(*messages: IndexedMessage) -> set[str]:
    return {m.email_id for m in messages}


class SearchIndexContract:
    @pytest.fixture
    async def index(self) -> AsyncIterator[SearchIndex]:
        raise NotImplementedError
        yield

    @pytest.fixture
    def exact_field_phrases(self) -> bool:
        return True

    # sequence and writes

    async def test_a_new_index_has_applied_nothing(self, index: SearchIndex) -> None:
        assert await index.applied_seq() == 0
        assert (await index.search(ALICE, query.All())).hits == []

    async def test_apply_records_the_sequence_and_never_lowers_it(
            self, index: SearchIndex) -> None:
        await add(index, message(), seq=7)
        assert await index.applied_seq() == 7
        await index.apply([], 5)
        assert await index.applied_seq() == 7
        page = await index.search(ALICE, query.All())
        assert page.applied_seq == 7

    async def test_replaying_a_batch_changes_nothing(self, index: SearchIndex) -> None:
        m = message(body="unique zebra")
        batch = [Upsert(m), UpdateSummary(ALICE, with_summary(m, is_starred=True))]
        await index.apply(batch, 3)
        await index.apply(batch, 3)
        assert await found(index, "zebra is:starred") == email_ids(m)
        assert (await index.search(ALICE, query.All())).total_estimate == 1

    async def test_operations_of_one_batch_apply_in_order(self, index: SearchIndex) -> None:
        kept, gone = message(body="alpha"), message(body="alpha")
        await index.apply([
            Upsert(kept), Upsert(gone),
            UpdateSummary(ALICE, with_summary(kept, is_read=True, folder_id=ARCHIVE)),
            Delete(ALICE, gone.email_id),
        ], 1)
        assert await found(index, "alpha") == email_ids(kept)
        assert await found(index, "alpha is:read in:archive") == email_ids(kept)

    async def test_update_keeps_the_text_and_takes_the_new_summary(
            self, index: SearchIndex) -> None:
        m = message(body="the giraffe budget", filenames=("plan.pdf",))
        await add(index, m)
        await index.apply([UpdateSummary(ALICE, with_summary(
            m, is_read=True, is_starred=True, folder_id=ARCHIVE))], 2)
        assert await found(index, "giraffe filename:plan is:read is:starred in:archive") \
            == email_ids(m)
        assert await found(index, "giraffe in:inbox") == set()
        record = await index.get(ALICE, m.email_id)
        assert record is not None and record.summary.folder_id == ARCHIVE
        assert record.body == "the giraffe budget"

    async def test_an_update_of_an_unknown_message_adds_it_from_its_summary(
            self, index: SearchIndex) -> None:
        m = message(body="never indexed")
        await index.apply([UpdateSummary(ALICE, with_summary(m, is_starred=True))], 1)
        assert await found(index, "is:starred") == email_ids(m)

    async def test_delete_removes_the_message_and_repeating_it_is_harmless(
            self, index: SearchIndex) -> None:
        m, other = message(body="walrus"), message(body="walrus")
        await add(index, m, other)
        await index.apply([Delete(ALICE, m.email_id)], 2)
        await index.apply([Delete(ALICE, m.email_id), Delete(ALICE, str(uuid.uuid1()))], 3)
        assert await found(index, "walrus") == email_ids(other)
        assert await index.get(ALICE, m.email_id) is None

    async def test_delete_user_forgets_only_that_users_mail(self, index: SearchIndex) -> None:
        a, b = message(ALICE, body="shared word"), message(BOB, body="shared word")
        await add(index, a, b)
        await index.apply([DeleteUser(ALICE), Upsert(message(ALICE, body="fresh"))], 2)
        assert await found(index, "shared", ALICE) == set()
        assert await found(index, "fresh", ALICE) != set()
        assert await found(index, "shared", BOB) == email_ids(b)

    # isolation

    async def test_a_user_never_finds_another_users_mail(self, index: SearchIndex) -> None:
        a = message(ALICE, subject="secret merger", body="confidential numbers",
                    filenames=("deal.pdf",), starred=True)
        await add(index, a)
        for text in ("secret", "confidential", "filename:deal", "is:starred", "",
                     "-nothing", "secret OR anything", "in:inbox"):
            assert await found(index, text, BOB) == set(), text
        assert await index.get(BOB, a.email_id) is None
        assert await found(index, "secret", ALICE) == email_ids(a)

    # words

    async def test_words_match_whatever_their_case_and_accents(
            self, index: SearchIndex) -> None:
        m = message(subject="Réunion à Zürich", body="Le CAFÉ est fermé. Straße")
        await add(index, m)
        for text in ("reunion", "RÉUNION", "zurich", "Zürich", "café", "cafe", "FERME"):
            assert await found(index, text) == email_ids(m), text

    async def test_every_free_word_must_match(self, index: SearchIndex) -> None:
        both, one = message(body="apple banana"), message(body="apple cherry")
        await add(index, both, one)
        assert await found(index, "apple banana") == email_ids(both)
        assert await found(index, "apple") == email_ids(both, one)
        assert await found(index, "apple durian") == set()

    async def test_free_words_search_addresses_subject_body_and_filenames(
            self, index: SearchIndex) -> None:
        m = message(subject="invoice", body="see attached", sender=("Dora", "dora@x.test"),
                    to=("Erin <erin@example.test>",), cc=("frank@example.test",),
                    bcc=("gina@example.test",), filenames=("budget-2024.xlsx",))
        await add(index, m)
        for word in ("invoice", "attached", "dora", "erin", "frank", "gina", "budget",
                     "xlsx"):
            assert await found(index, word) == email_ids(m), word

    async def test_a_phrase_needs_its_words_together_and_in_order(
            self, index: SearchIndex) -> None:
        together = message(body="the big red balloon")
        apart = message(body="a red and big balloon")
        await add(index, together, apart)
        assert await found(index, '"big red"') == email_ids(together)
        assert await found(index, '"red big"') == set()
        assert await found(index, "big red") == email_ids(together, apart)

    async def test_a_quoted_phrase_inside_a_field_operator(
            self, index: SearchIndex, exact_field_phrases: bool) -> None:
        hit = message(subject="team lunch friday")
        other = message(subject="friday: lunch with the team")
        await add(index, hit, other)
        matches = await found(index, 'subject:"team lunch"')
        assert hit.email_id in matches
        if exact_field_phrases:
            assert matches == email_ids(hit)

    async def test_a_word_with_punctuation_matches_as_a_phrase(
            self, index: SearchIndex) -> None:
        m = message(body="send an e-mail to support")
        await add(index, m, message(body="mail from e to somewhere"))
        assert await found(index, "e-mail") == email_ids(m)

    async def test_a_prefix_matches_words_that_start_with_it(self, index: SearchIndex) -> None:
        m, other = message(body="the payment arrived"), message(body="a paycheck")
        await add(index, m, other, message(body="nothing here"))
        assert await found(index, "paym*") == email_ids(m)
        assert await found(index, "pay*") == email_ids(m, other)
        assert await found(index, "PAY*") == email_ids(m, other)
        assert len(await found(index, "subject:quart*")) == 3  # "Quarterly report"

    # field operators

    async def test_field_operators_search_their_field_only(self, index: SearchIndex) -> None:
        m = message(subject="apricot", body="banana", sender=("Cherry Pie", "cp@x.test"),
                    to=("Damson <damson@x.test>",), cc=("elder@x.test",),
                    bcc=("fig@x.test",), filenames=("grape.txt",))
        await add(index, m)
        expected = {"subject": "apricot", "from": "cherry", "to": "damson", "cc": "elder",
                    "bcc": "fig", "filename": "grape"}
        for field, word in expected.items():
            assert await found(index, f"{field}:{word}") == email_ids(m), field
            assert await found(index, f"{field}:banana") == set(), field

    async def test_from_matches_the_name_or_the_whole_address(
            self, index: SearchIndex) -> None:
        m = message(sender=("Alice Smith", "alice.smith@corp.example"))
        await add(index, m, message(sender=("Bob", "bob@corp.example")))
        for text in ("from:alice", "from:Smith", "from:alice.smith@corp.example",
                     'from:"Alice Smith"', "FROM:ALICE"):
            assert await found(index, text) == email_ids(m), text
        assert len(await found(index, "from:corp.example")) == 2

    async def test_a_field_operator_applies_to_a_group(self, index: SearchIndex) -> None:
        a = message(sender=("Ann", "ann@x.test"))
        b = message(sender=("Ben", "ben@x.test"))
        await add(index, a, b, message(sender=("Cy", "cy@x.test")))
        assert await found(index, "from:(ann OR ben)") == email_ids(a, b)

    # flags, folders, dates, sizes

    async def test_flags_and_attachments(self, index: SearchIndex) -> None:
        unread = message()
        read_starred = message(read=True, starred=True)
        attached = message(read=True, filenames=("x.pdf",))
        await add(index, unread, read_starred, attached)
        assert await found(index, "is:unread") == email_ids(unread)
        assert await found(index, "is:read") == email_ids(read_starred, attached)
        assert await found(index, "is:starred") == email_ids(read_starred)
        assert await found(index, "is:unstarred") == email_ids(unread, attached)
        assert await found(index, "has:attachment") == email_ids(attached)
        assert await found(index, "-has:attachment") == email_ids(unread, read_starred)

    async def test_in_matches_the_resolved_folders_only(self, index: SearchIndex) -> None:
        inbox, archived = message(folder=INBOX), message(folder=ARCHIVE)
        await add(index, inbox, archived, message(folder=TRASH))
        assert await found(index, "in:inbox") == email_ids(inbox)
        assert await found(index, "in:archive OR in:inbox") == email_ids(inbox, archived)
        assert await found(index, "in:nowhere") == set()  # resolved to no folder

    async def test_dates_after_include_their_day_and_before_exclude_it(
            self, index: SearchIndex) -> None:
        last_day_of_may = message(date="2024-05-31T23:59:59")
        first_of_june = message(date="2024-06-01T00:00:00")
        mid_june = message(date="2024-06-10T08:00:00")
        await add(index, last_day_of_may, first_of_june, mid_june)
        assert await found(index, "after:2024-06-01") == email_ids(first_of_june, mid_june)
        assert await found(index, "before:2024-06-01") == email_ids(last_day_of_may)
        assert await found(index, "after:2024/06/01 before:2024/06/10") == \
            email_ids(first_of_june)

    async def test_older_and_newer_than_split_at_the_same_instant(
            self, index: SearchIndex) -> None:
        old = message(date="2024-06-07T11:59:59")      # NOW - 7 days - 1 s
        edge = message(date="2024-06-08T12:00:00")     # NOW - 7 days exactly
        recent = message(date="2024-06-14T00:00:00")
        await add(index, old, edge, recent)
        assert await found(index, "older_than:7d") == email_ids(old)
        assert await found(index, "newer_than:7d") == email_ids(edge, recent)
        assert await found(index, "newer_than:1w") == email_ids(edge, recent)
        assert await found(index, "older_than:1m") == set()
        assert await found(index, "newer_than:1y") == email_ids(old, edge, recent)

    async def test_sizes_are_strictly_larger_or_smaller(self, index: SearchIndex) -> None:
        small, exact, large = message(size=10239), message(size=10240), message(size=10241)
        await add(index, small, exact, large)
        assert await found(index, "larger:10K") == email_ids(large)
        assert await found(index, "smaller:10k") == email_ids(small)
        assert await found(index, "larger:10239 smaller:10241") == email_ids(exact)
        assert await found(index, "larger:1M") == set()

    # boolean structure

    async def test_or_not_and_parentheses(self, index: SearchIndex) -> None:
        a, b, c = message(body="red circle"), message(body="blue circle"), \
            message(body="red square")
        await add(index, a, b, c)
        assert await found(index, "red OR blue") == email_ids(a, b, c)
        assert await found(index, "circle -red") == email_ids(b)
        assert await found(index, "(red OR blue) circle") == email_ids(a, b)
        assert await found(index, "red (circle OR square) -square") == email_ids(a)
        assert await found(index, '-"red circle"') == email_ids(b, c)
        assert await found(index, "-red -blue") == set()

    async def test_a_query_of_negations_matches_everything_else(
            self, index: SearchIndex) -> None:
        a, b = message(body="keep this"), message(body="drop this")
        await add(index, a, b)
        assert await found(index, "-drop") == email_ids(a)
        assert await found(index, "") == email_ids(a, b)

    # order, pages, counts, snippets

    async def test_newest_first_pages_through_every_match_once(
            self, index: SearchIndex) -> None:
        messages = [message(body=f"pager {n}") for n in range(23)]
        await add(index, *messages)
        result = await pages(index, "pager", size=5)
        seen = [h.summary.email_id for p in result for h in p.hits]
        assert seen == [m.email_id for m in reversed(messages)]
        assert [p.total_estimate for p in result] == [23] * 5
        assert all(not p.truncated for p in result)

    async def test_mail_arriving_between_pages_causes_no_repeat_or_gap(
            self, index: SearchIndex) -> None:
        messages = [message(body="stream") for _ in range(6)]
        await add(index, *messages)
        node = query.parse("stream")
        first = await index.search(ALICE, node, page_size=3)
        await add(index, message(body="stream"), seq=2)
        second = await index.search(ALICE, node, page_size=3,
                                    page_token=first.next_page_token)
        seen = [h.summary.email_id for h in [*first.hits, *second.hits]]
        assert seen == [m.email_id for m in reversed(messages)]
        assert second.next_page_token == ""

    async def test_relevance_order_pages_without_repeats(self, index: SearchIndex) -> None:
        strong = message(subject="kiwi kiwi", body="kiwi kiwi kiwi kiwi")
        weak = [message(body=f"kiwi and {n} other words to dilute it") for n in range(6)]
        await add(index, strong, *weak)
        result = await pages(index, "kiwi", size=4, order=Order.RELEVANCE)
        seen = [h.summary.email_id for p in result for h in p.hits]
        assert sorted(seen) == sorted(email_ids(strong, *weak))
        assert seen[0] == strong.email_id

    async def test_the_snippet_marks_the_matching_words(self, index: SearchIndex) -> None:
        body = ("Hello team,\n\nThe Café meeting moves to Thursday. Please bring the "
                "quarterly numbers.\n\nThanks")
        m = message(body=body)
        await add(index, m)
        (hit,) = (await index.search(ALICE, query.parse("cafe quarter*"))).hits
        marked = [fold(hit.snippet[h.start:h.end]) for h in hit.highlights]
        assert marked == ["cafe", "quarterly"]
        assert "Thursday" in hit.snippet

    async def test_a_match_outside_the_body_shows_the_preview(
            self, index: SearchIndex) -> None:
        m = message(subject="lychee", body="nothing about fruit here")
        await add(index, m)
        (hit,) = (await index.search(ALICE, query.parse("lychee"))).hits
        assert hit.snippet == m.summary.preview and hit.highlights == ()

    async def test_results_are_the_listing_summaries(self, index: SearchIndex) -> None:
        m = message(body="summary check", starred=True, filenames=("a.txt",))
        await add(index, m)
        (hit,) = (await index.search(ALICE, query.parse("summary"))).hits
        assert hit.summary == m.summary

    async def test_malformed_page_tokens_and_sizes_are_invalid(
            self, index: SearchIndex) -> None:
        for token in ("garbage", "bzox", "%%%"):
            with pytest.raises(InvalidArgument):
                await index.search(ALICE, query.All(), page_token=token)
        relevance_token = "bzo1"  # "o:5": an offset token is no newest-first token
        with pytest.raises(InvalidArgument):
            await index.search(ALICE, query.All(), page_token=relevance_token)
        for size in (-1, 101):
            with pytest.raises(InvalidArgument):
                await index.search(ALICE, query.All(), page_size=size)

    async def test_unicode_text_beyond_latin(self, index: SearchIndex) -> None:
        m = message(subject="Привет мир", body="Ελληνικά κείμενα και 東京")
        await add(index, m)
        for text in ("привет", "ПРИВЕТ", "мир", "κείμενα", "東京"):
            assert await found(index, text) == email_ids(m), text


class TestTantivyIndex(SearchIndexContract):
    @pytest.fixture
    async def index(self, tmp_path: Path) -> AsyncIterator[SearchIndex]:
        index = await TantivyIndex.open(tmp_path / "search")
        yield index
        await index.close()

    async def test_the_index_and_its_sequence_survive_a_reopen(self, tmp_path: Path) -> None:
        first = await TantivyIndex.open(tmp_path / "again")
        m = message(body="durable")
        await first.apply([Upsert(m)], 42)
        await first.close()
        second = await TantivyIndex.open(tmp_path / "again")
        try:
            assert await second.applied_seq() == 42
            assert await found(second, "durable") == email_ids(m)
        finally:
            await second.close()


    async def test_commits_leave_no_deleted_document_in_older_segments(
            self, tmp_path: Path) -> None:
        """Each commit adds its applied-sequence document without deleting the previous
        one: a segment without deletes is merged by copying its stored blocks, not by
        decompressing and compressing them again."""
        index = await TantivyIndex.open(tmp_path / "segments")
        try:
            for seq in (1, 2, 3):
                await add(index, message(body=f"batch {seq}"), seq=seq)
            assert await index.applied_seq() == 3
            assert (await index.status()).documents == 3
        finally:
            await index.close()
        assert not list((tmp_path / "segments").glob("*.del"))

    async def test_the_highest_sequence_counts_across_prunings_and_reopens(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(index_tantivy, "META_PRUNE", 3)
        path = tmp_path / "pruned"
        index = await TantivyIndex.open(path)
        messages = [message(body=f"note {n}") for n in range(7)]
        try:
            for seq, m in enumerate(messages, start=10):
                await add(index, m, seq=seq)
                await index.apply([], seq - 5)  # a replayed, older sequence never counts
        finally:
            await index.close()
        assert list(path.glob("*.del"))  # pruned: the old ones were deleted
        again = await TantivyIndex.open(path)
        try:
            assert await again.applied_seq() == 16
            status = await again.status()
            assert (status.applied_seq, status.documents) == (16, 7)
            assert await found(again, "note") == email_ids(*messages)
        finally:
            await again.close()


class TestMeiliIndex(SearchIndexContract):
    @pytest.fixture
    async def index(self, meilisearch_url: str) -> AsyncIterator[SearchIndex]:
        # A fresh index per test on the session's server.
        base, _, params = meilisearch_url.partition("?")
        url = f"{base}/t{uuid.uuid4().hex}?{params}"
        index = await MeiliIndex.open(url)
        yield index
        await index.close()
        target = parse_url(url)
        import meilisearch

        meilisearch.Client(target.url, target.key).delete_index(target.index)

    @pytest.fixture
    def exact_field_phrases(self) -> bool:
        return False

    async def test_counting_stops_at_max_total_hits_and_says_so(
            self, index: SearchIndex) -> None:
        assert isinstance(index, MeiliIndex)
        many = [message(body="crowd") for _ in range(index.max_total_hits + 5)]
        await add(index, *many)
        page = await index.search(ALICE, query.parse("crowd"), page_size=100)
        assert page.truncated
        assert page.total_estimate == index.max_total_hits
        # Newest-first paging is by sort key, so it reaches past the limit.
        result = await pages(index, "crowd", size=100)
        assert sum(len(p.hits) for p in result) == len(many)
