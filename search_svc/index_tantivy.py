"""The embedded SearchIndex: tantivy in-process, on disk under data_dir/search.

One IndexWriter for the life of the adapter (tantivy allows one per index directory, and
holds a lock file for it); writes are serialized and committed once per ``apply``, and
the reader is reloaded right after, so a search that starts after ``apply`` returns sees
its batch. The applied EVENTS sequence is a document of its own, written in the same
commit as the batch: the index never claims changes it does not hold.

Each commit adds such a document and the highest sequence among them counts; they are
deleted together only every META_PRUNE commits. Deleting the previous one in every commit
would leave a deleted document in every segment, and tantivy copies the stored documents of
a segment without deletes block by block when it merges, but decompresses and compresses
again those of one with deletes: a fifth of the indexing CPU at 100 KB.

Ids are matched through raw *text* fields (``doc_id`` = "user/email", ``user_id``):
tantivy-py's delete_documents_by_term silently deletes nothing on integer fields.
Every blocking call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import tantivy
from tantivy import FieldType, Filter, Occur, Query, TextAnalyzerBuilder, Tokenizer

from mailgrid.errors import Unavailable
from mailgrid.v1 import common_pb2
from search_svc import query as q
from search_svc import snippets
from search_svc.ports import (
    DEFAULT_PAGE_SIZE,
    Delete,
    DeleteUser,
    Hit,
    IndexedMessage,
    IndexStatus,
    Operation,
    Order,
    SearchPage,
    UpdateSummary,
    Upsert,
    check_page_size,
    date_millis,
    decode_token,
    encode_token,
    flag_names,
    sender_text,
    sort_key,
)

log = logging.getLogger(__name__)

ANALYZER = "mailgrid"
META_ID = "__meta__"
# Commits between two prunings of the applied-sequence documents (see above).
META_PRUNE = 256
# Fields a word without an operator is looked for in.
ANY_TEXT = ("from", "to", "cc", "bcc", "subject", "body", "filename")
WRITER_HEAP = 64 * 1024 * 1024


def analyzer() -> tantivy.TextAnalyzer:
    """Words split on anything not a letter or digit, lower-cased, accents folded
    (so "Café" matches "cafe"), words over 40 bytes dropped (base64 noise)."""
    return (TextAnalyzerBuilder(Tokenizer.simple()).filter(Filter.remove_long(40))
            .filter(Filter.lowercase()).filter(Filter.ascii_fold()).build())


def build_schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    for name in ("doc_id", "user_id", "folder_id", "flags"):
        sb.add_text_field(name, stored=name != "flags", tokenizer_name="raw",
                          index_option="basic")
    for name in ("from", "subject"):  # rebuilt from the stored summary
        sb.add_text_field(name, stored=False, tokenizer_name=ANALYZER)
    for name in ("to", "cc", "bcc", "body", "filename"):
        sb.add_text_field(name, stored=True, tokenizer_name=ANALYZER)
    for name in ("date", "size", "sort_key"):
        sb.add_integer_field(name, stored=False, indexed=True, fast=True)
    sb.add_integer_field("applied_seq", stored=True)
    sb.add_bytes_field("summary", stored=True)
    return sb.build()


class TantivyIndex:
    """SearchIndex on a tantivy index directory (see search_svc.ports.SearchIndex)."""

    backend = "embedded"

    def __init__(self, path: Path, *, writer_threads: int = 1) -> None:
        self.path = path
        self.schema = build_schema()
        self._analyzer = analyzer()
        path.mkdir(parents=True, exist_ok=True)
        self._index = tantivy.Index(self.schema, path=str(path), reuse=True)
        self._index.register_tokenizer(ANALYZER, analyzer())
        self._index.config_reader(reload_policy="manual")
        try:
            self._writer = self._index.writer(WRITER_HEAP * writer_threads, writer_threads)
        except ValueError as err:  # the lock file of another process
            raise Unavailable(f"search index {path} is in use: {err}") from err
        self._write_lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._applied, self._meta_docs = self._read_applied_seq()

    @classmethod
    async def open(cls, path: Path, *, writer_threads: int = 1) -> TantivyIndex:
        return await asyncio.to_thread(cls, path, writer_threads=writer_threads)

    # writing

    async def apply(self, operations: Sequence[Operation], applied_seq: int) -> None:
        async with self._write_lock:
            await asyncio.to_thread(self._apply, list(operations), applied_seq)

    def _apply(self, operations: list[Operation], applied_seq: int) -> None:
        with self._thread_lock:
            try:
                self._apply_ops(operations)
                seq = max(self._applied, applied_seq)
                prune = self._meta_docs >= META_PRUNE
                if prune:
                    self._writer.delete_documents_by_term("doc_id", META_ID)
                self._writer.add_document(tantivy.Document(
                    doc_id=META_ID, user_id=META_ID, applied_seq=seq))
                self._writer.commit()
            except Exception as err:
                self._writer.rollback()
                raise Unavailable(f"search index write failed: {err}") from err
            self._index.reload()
            self._applied = seq
            self._meta_docs = 1 if prune else self._meta_docs + 1

    def _apply_ops(self, operations: list[Operation]) -> None:
        # What this batch wrote, which the searcher cannot see before the commit.
        overlay: dict[str, IndexedMessage | None] = {}
        cleared: set[str] = set()
        for op in operations:
            if isinstance(op, Upsert):
                self._put(op.message)
                overlay[_doc_id(op.message.user_id, op.message.email_id)] = op.message
            elif isinstance(op, UpdateSummary):
                key = _doc_id(op.user_id, op.summary.email_id)
                if key in overlay:
                    current = overlay[key]
                else:
                    current = None if op.user_id in cleared else self._get(key)
                updated = (replace(current, summary=op.summary) if current is not None
                           else IndexedMessage(op.user_id, op.summary))
                self._put(updated)
                overlay[key] = updated
            elif isinstance(op, Delete):
                key = _doc_id(op.user_id, op.email_id)
                self._writer.delete_documents_by_term("doc_id", key)
                overlay[key] = None
            elif isinstance(op, DeleteUser):
                self._writer.delete_documents_by_term("user_id", op.user_id)
                cleared.add(op.user_id)
                prefix = _doc_id(op.user_id, "")
                for key in [k for k in overlay if k.startswith(prefix)]:
                    overlay[key] = None

    def _put(self, message: IndexedMessage) -> None:
        key = _doc_id(message.user_id, message.email_id)
        self._writer.delete_documents_by_term("doc_id", key)
        self._writer.add_document(self._document(message))

    def _document(self, m: IndexedMessage) -> tantivy.Document:
        s = m.summary
        doc = tantivy.Document()
        doc.add_text("doc_id", _doc_id(m.user_id, m.email_id))
        doc.add_text("user_id", m.user_id)
        doc.add_text("folder_id", s.folder_id)
        for name in flag_names(s):
            doc.add_text("flags", name)
        doc.add_text("from", sender_text(s))
        doc.add_text("subject", s.subject)
        for name, values in (("to", m.to), ("cc", m.cc), ("bcc", m.bcc),
                             ("filename", m.filenames)):
            for value in values:
                doc.add_text(name, value)
        doc.add_text("body", m.body)
        doc.add_integer("date", date_millis(s))
        doc.add_integer("size", s.size)
        doc.add_integer("sort_key", sort_key(s.email_id))
        doc.add_bytes("summary", s.SerializeToString())
        return doc

    # reading

    async def applied_seq(self) -> int:
        return self._applied

    def _read_applied_seq(self) -> tuple[int, int]:
        """The applied sequence (the highest of the documents holding one) and how many
        such documents there are."""
        searcher = self._index.searcher()
        query = self._meta_query()
        count = _count(searcher.search(query, 1, count=True))
        hits = searcher.search(query, count).hits if count else []
        values = [searcher.doc(address).get_first("applied_seq") for _, address in hits]
        return max((int(value or 0) for value in values), default=0), count

    def _meta_query(self) -> Query:
        return Query.term_query(self.schema, "doc_id", META_ID)

    async def get(self, user_id: str, email_id: str) -> IndexedMessage | None:
        return await asyncio.to_thread(self._get, _doc_id(user_id, email_id))

    def _get(self, key: str) -> IndexedMessage | None:
        searcher = self._index.searcher()
        hits = searcher.search(Query.term_query(self.schema, "doc_id", key), 1).hits
        if not hits:
            return None
        return _record(searcher.doc(hits[0][1]))

    async def search(self, user_id: str, query: q.Node, *, order: Order = Order.NEWEST,
                     page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
                     ) -> SearchPage:
        size = check_page_size(page_size)
        if order is Order.NEWEST:
            before, seen = decode_token(page_token, "k", 2) if page_token else (0, 0)
        else:
            before, seen = 0, decode_token(page_token, "o")[0] if page_token else 0
        return await asyncio.to_thread(self._search, user_id, query, order, size,
                                       before, seen)

    def _search(self, user_id: str, node: q.Node, order: Order, size: int,
                before: int, seen: int) -> SearchPage:
        matcher = self._query(node)
        clauses = [(Occur.Must, Query.term_query(self.schema, "user_id", user_id)),
                   (Occur.Must, matcher)]
        searcher = self._index.searcher()
        if order is Order.NEWEST:
            if before:
                clauses.append((Occur.Must, Query.range_query(
                    self.schema, "sort_key", FieldType.Integer, None, before,
                    include_upper=False)))
            result = searcher.search(Query.boolean_query(clauses), size, count=True,
                                     order_by_field="sort_key", order=tantivy.Order.Desc)
            total = seen + int(result.count)  # type: ignore[attr-defined]  # missing from the .pyi
        else:
            result = searcher.search(Query.boolean_query(clauses), size, count=True,
                                     offset=seen)
            total = int(result.count)  # type: ignore[attr-defined]
        docs = [searcher.doc(address) for _, address in result.hits]
        hits = self._hits(node, docs)
        done = seen + len(hits)
        token = ""
        if hits and done < total:
            token = (encode_token("k", sort_key(hits[-1].summary.email_id), done)
                     if order is Order.NEWEST else encode_token("o", done))
        return SearchPage(hits, token, total, False, self._applied)

    def _hits(self, node: q.Node, docs: list[tantivy.Document]) -> list[Hit]:
        terms = snippets.highlight_terms(node)
        hits = []
        for doc in docs:
            summary = common_pb2.MessageSummary.FromString(doc.get_first("summary") or b"")
            text, marks = snippets.snippet(str(doc.get_first("body") or ""), summary.preview,
                                           terms)
            hits.append(Hit(summary, text, marks))
        return hits

    # translating the query tree

    def _query(self, node: q.Node) -> Query:
        if isinstance(node, q.All):
            return Query.all_query()
        if isinstance(node, q.Text):
            fields = (node.field,) if node.field else ANY_TEXT
            field_queries = [self._text(f, node) for f in fields]
            if len(field_queries) == 1:
                return field_queries[0]
            return Query.boolean_query([(Occur.Should, fq) for fq in field_queries])
        if isinstance(node, q.Flag):
            return Query.term_query(self.schema, "flags", node.name)
        if isinstance(node, q.In):
            if not node.folder_ids:
                return Query.empty_query()
            return Query.term_set_query(self.schema, "folder_id", list(node.folder_ids))
        if isinstance(node, q.DateRange | q.SizeRange):
            name = "date" if isinstance(node, q.DateRange) else "size"
            return Query.range_query(self.schema, name, FieldType.Integer, node.lo, node.hi)
        if isinstance(node, q.Or):
            return Query.boolean_query([(Occur.Should, self._query(i)) for i in node.items])
        if isinstance(node, q.Not):
            return Query.boolean_query([(Occur.Must, Query.all_query()),
                                        (Occur.MustNot, self._query(node.item))])
        assert isinstance(node, q.And)
        clauses: list[tuple[Occur, Query]] = [
            (Occur.MustNot, self._query(i.item)) if isinstance(i, q.Not)
            else (Occur.Must, self._query(i)) for i in node.items]
        if all(occur == Occur.MustNot for occur, _ in clauses):
            clauses.append((Occur.Must, Query.all_query()))
        return Query.boolean_query(clauses)

    def _text(self, field: str, node: q.Text) -> Query:
        words = self._analyzer.analyze(node.text)
        if not words:
            return Query.empty_query()
        if len(words) == 1 and node.prefix:
            return Query.fuzzy_term_query(self.schema, field, words[0], distance=0,
                                          prefix=True)
        if len(words) == 1:
            return Query.term_query(self.schema, field, words[0])
        if node.prefix:
            return Query.phrase_prefix_query(self.schema, field, list(words))
        return Query.phrase_query(self.schema, field, list(words))

    # status

    async def status(self) -> IndexStatus:
        def count() -> int:
            searcher = self._index.searcher()
            meta = _count(searcher.search(self._meta_query(), 1, count=True))
            return max(0, int(searcher.num_docs) - meta)

        documents = await asyncio.to_thread(count)
        return IndexStatus(self.backend, self._applied, documents, {"path": str(self.path)})

    async def close(self) -> None:
        async with self._write_lock:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._thread_lock:
            writer, self._writer = self._writer, None  # type: ignore[assignment]
            if writer is not None:
                writer.wait_merging_threads()  # also releases the directory lock


def _count(result: tantivy.SearchResult) -> int:
    """How many documents matched (tantivy-py's type stubs lack the attribute)."""
    return int(result.count or 0)  # type: ignore[attr-defined]


def _doc_id(user_id: str, email_id: str) -> str:
    return f"{user_id}/{email_id}"


def _record(doc: tantivy.Document) -> IndexedMessage:
    fields: dict[str, list[Any]] = doc.to_dict()
    user_id, _, _ = str(fields["doc_id"][0]).partition("/")
    return IndexedMessage(
        user_id=user_id,
        summary=common_pb2.MessageSummary.FromString(bytes(fields["summary"][0])),
        to=tuple(fields.get("to", ())), cc=tuple(fields.get("cc", ())),
        bcc=tuple(fields.get("bcc", ())),
        body=str(fields.get("body", [""])[0]),
        filenames=tuple(fields.get("filename", ())),
    )
