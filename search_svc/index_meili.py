"""The Meilisearch SearchIndex: one index for every mailbox, for when one machine is not
enough (URL ``meilisearch://HOST:PORT/INDEX?key=KEY&tls=1``).

- Isolation: ``user_id`` is a filterable attribute and every search filter starts with
  ``user_id = "<id>"``; there is no code path that searches without it.
- Exact matching: the query tree becomes a Meilisearch *filter* over token arrays
  (``terms`` for every searchable word, ``from_terms``, ``subject_terms``... per field),
  tokenized and folded as the embedded index does, so both backends answer alike. The
  free-text ``q`` only carries required phrases (Meilisearch matches them by adjacency)
  and, when relevance order is asked for, the required words to rank by. Phrases inside
  a field operator or under OR/NOT match their words in any order: filters know no
  adjacency (``exact_field_phrases`` is False).
- Prefixes use ``STARTS WITH``, behind Meilisearch's ``containsFilter`` experimental
  feature, which ``open`` enables.
- Read-your-writes: ``apply`` waits on the task ids it enqueued (Meilisearch indexes
  asynchronously) and fails if any task failed.
- Truncation: Meilisearch stops counting at ``maxTotalHits`` (1,000 by default) and
  cannot page by relevance past it; the page says so (``truncated``) instead of
  pretending the count is exact. Newest-first pages use a sort-key filter, not an offset,
  so they page through any number of results.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import meilisearch
from meilisearch.errors import MeilisearchError

from mailgrid.errors import InvalidArgument, Unavailable
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

META_ID = "__meta__"
TASK_TIMEOUT_MS = 60_000
TASK_POLL_MS = 5
TEXT_FIELDS = ("from", "to", "cc", "bcc", "subject", "filename")
FILTERABLE = ["id", "user_id", "folder_id", "flags", "date", "size", "sort_key", "terms",
              *(f"{name}_terms" for name in TEXT_FIELDS)]
SEARCHABLE = ["subject", "from", "to", "cc", "bcc", "filename", "body"]
NOTHING = f'id = "{META_ID}-none"'
EVERYTHING = "id EXISTS"


@dataclass(frozen=True)
class MeiliTarget:
    url: str
    index: str
    key: str | None


def parse_url(url: str) -> MeiliTarget:
    """meilisearch://HOST:PORT[/INDEX][?key=KEY&tls=1] → where and what to use."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "meilisearch" or not parts.netloc:
        raise InvalidArgument(f"expected meilisearch://HOST:PORT/INDEX?key=..., got {url!r}")
    params = urllib.parse.parse_qs(parts.query)
    scheme = "https" if params.get("tls", ["0"])[0] in ("1", "true") else "http"
    index = parts.path.strip("/") or "mailgrid"
    return MeiliTarget(f"{scheme}://{parts.netloc}", index, params.get("key", [None])[0])


class MeiliIndex:
    """SearchIndex on a Meilisearch index (see search_svc.ports.SearchIndex)."""

    backend = "meilisearch"
    exact_field_phrases = False

    def __init__(self, target: MeiliTarget) -> None:
        self.target = target
        self._client = meilisearch.Client(target.url, target.key, timeout=30)
        self._index = self._client.index(target.index)
        self._lock = asyncio.Lock()
        self._applied = 0
        self.max_total_hits = 1000

    @classmethod
    async def open(cls, url: str) -> MeiliIndex:
        index = cls(parse_url(url))
        await index._call(index._setup)
        index._applied = await index._call(index._read_applied_seq)
        return index

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (MeilisearchError, OSError) as err:
            raise Unavailable(f"meilisearch at {self.target.url}: {err}") from err

    def _setup(self) -> None:
        self._client.update_experimental_features({"containsFilter": True})
        try:
            self._index.fetch_info()
        except meilisearch.errors.MeilisearchApiError as err:
            if err.code != "index_not_found":
                raise
            self._wait([self._client.create_index(self.target.index,
                                                  {"primaryKey": "id"}).task_uid])
        self._wait([self._index.update_settings({
            "filterableAttributes": FILTERABLE,
            "sortableAttributes": ["sort_key", "date"],
            "searchableAttributes": SEARCHABLE,
        }).task_uid])
        pagination = self._index.get_pagination_settings()
        self.max_total_hits = int(getattr(pagination, "max_total_hits", 1000) or 1000)

    def _wait(self, task_uids: list[int]) -> None:
        """Waits for the tasks (processed in order) and fails if any of them failed."""
        for uid in task_uids:
            task = self._client.wait_for_task(uid, timeout_in_ms=TASK_TIMEOUT_MS,
                                              interval_in_ms=TASK_POLL_MS)
            if task.status != "succeeded":
                raise Unavailable(f"meilisearch task {uid} {task.status}: {task.error}")

    # writing

    async def apply(self, operations: Sequence[Operation], applied_seq: int) -> None:
        async with self._lock:
            seq = max(self._applied, applied_seq)
            await self._call(self._apply, list(operations), seq)
            self._applied = seq

    def _apply(self, operations: list[Operation], seq: int) -> None:
        tasks = [self._enqueue(kind, group) for kind, group in _runs(operations)]
        meta = {"id": META_ID, "user_id": META_ID, "applied_seq": seq}
        tasks.append(self._index.update_documents([meta]).task_uid)
        self._wait(tasks)

    def _enqueue(self, kind: type, group: list[Operation]) -> int:
        if kind is Upsert:
            docs = [_document(op.message) for op in group if isinstance(op, Upsert)]
            return int(self._index.add_documents(docs).task_uid)
        if kind is UpdateSummary:
            docs = [_summary_fields(op.user_id, op.summary) for op in group
                    if isinstance(op, UpdateSummary)]
            return int(self._index.update_documents(docs).task_uid)
        if kind is Delete:
            ids = ", ".join(_quote(_doc_id(op.user_id, op.email_id)) for op in group
                            if isinstance(op, Delete))
            return int(self._index.delete_documents(filter=f"id IN [{ids}]").task_uid)
        users = " OR ".join(f"user_id = {_quote(op.user_id)}" for op in group
                            if isinstance(op, DeleteUser))
        return int(self._index.delete_documents(filter=users).task_uid)

    # reading

    async def applied_seq(self) -> int:
        return self._applied

    def _read_applied_seq(self) -> int:
        try:
            doc = self._index.get_document(META_ID)
        except meilisearch.errors.MeilisearchApiError as err:
            if err.code == "document_not_found":
                return 0
            raise
        return int(getattr(doc, "applied_seq", 0) or 0)

    async def get(self, user_id: str, email_id: str) -> IndexedMessage | None:
        def read() -> IndexedMessage | None:
            try:
                doc = self._index.get_document(_doc_id(user_id, email_id), {
                    "fields": ["summary", "body", "to", "cc", "bcc", "filename"]})
            except meilisearch.errors.MeilisearchApiError as err:
                if err.code == "document_not_found":
                    return None
                raise
            fields = dict(doc)
            return IndexedMessage(
                user_id=user_id, summary=_summary(fields["summary"]),
                to=tuple(fields.get("to", ())), cc=tuple(fields.get("cc", ())),
                bcc=tuple(fields.get("bcc", ())), body=str(fields.get("body", "")),
                filenames=tuple(fields.get("filename", ())))

        result: IndexedMessage | None = await self._call(read)
        return result

    async def search(self, user_id: str, query: q.Node, *, order: Order = Order.NEWEST,
                     page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
                     ) -> SearchPage:
        size = check_page_size(page_size)
        if not user_id:
            raise InvalidArgument("user_id is required")
        conditions = [f"user_id = {_quote(user_id)}", _filter(query)]
        params: dict[str, Any] = {"limit": size, "attributesToRetrieve": ["summary", "body"]}
        phrases = [t for t in q.required_text(query) if t.field is None
                   and len(snippets.words_of(t.text)) > 1 and not t.prefix]
        text = " ".join(f'"{" ".join(snippets.words_of(t.text))}"' for t in phrases)
        if order is Order.NEWEST:
            before, seen = decode_token(page_token, "k", 2) if page_token else (0, 0)
            if before:
                conditions.append(f"sort_key < {before}")
            params["sort"] = ["sort_key:desc"]
        else:
            before, seen = 0, decode_token(page_token, "o")[0] if page_token else 0
            words = [w for t in q.required_text(query) if t.field is None
                     for w in snippets.words_of(t.text)]
            text = " ".join([text, *words]).strip()
            params.update(offset=seen, matchingStrategy="last")
        params["filter"] = " AND ".join(f"({c})" for c in conditions)
        reply: dict[str, Any] = await self._call(self._index.search, text, params)
        return self._page(reply, query, order, size, seen)

    def _page(self, reply: dict[str, Any], node: q.Node, order: Order, size: int,
              seen: int) -> SearchPage:
        terms = snippets.highlight_terms(node)
        hits = []
        for doc in reply["hits"]:
            summary = _summary(doc["summary"])
            text, marks = snippets.snippet(str(doc.get("body", "")), summary.preview, terms)
            hits.append(Hit(summary, text, marks))
        counted = int(reply.get("estimatedTotalHits", len(hits)))
        truncated = counted >= self.max_total_hits
        done = seen + len(hits)
        if order is Order.NEWEST:
            total = seen + counted
            more = len(hits) == size and (counted > size or truncated)
            token = encode_token("k", sort_key(hits[-1].summary.email_id), done) if more \
                and hits else ""
        else:
            total = counted
            more = len(hits) == size and done < min(counted, self.max_total_hits)
            token = encode_token("o", done) if more else ""
        return SearchPage(hits, token, total, truncated, self._applied)

    async def status(self) -> IndexStatus:
        stats = await self._call(self._index.get_stats)
        documents = max(0, int(stats.number_of_documents) - (1 if self._applied else 0))
        return IndexStatus(self.backend, self._applied, documents,
                           {"url": self.target.url, "index": self.target.index})

    async def close(self) -> None:
        """Nothing to release: every request is its own HTTP call."""


# ---- documents -----------------------------------------------------------------------

def _doc_id(user_id: str, email_id: str) -> str:
    # Meilisearch ids allow [A-Za-z0-9_-]; user and email ids are UUIDs.
    return f"{user_id}_{email_id}"


def _summary_fields(user_id: str, s: common_pb2.MessageSummary) -> dict[str, Any]:
    return {
        "id": _doc_id(user_id, s.email_id), "user_id": user_id, "folder_id": s.folder_id,
        "flags": flag_names(s), "date": date_millis(s), "size": s.size,
        "sort_key": sort_key(s.email_id),
        "summary": base64.b64encode(s.SerializeToString()).decode(),
        "from": sender_text(s), "subject": s.subject,
        "from_terms": _distinct(snippets.words_of(sender_text(s))),
        "subject_terms": _distinct(snippets.words_of(s.subject)),
    }


def _document(m: IndexedMessage) -> dict[str, Any]:
    doc = _summary_fields(m.user_id, m.summary)
    doc.update({"to": list(m.to), "cc": list(m.cc), "bcc": list(m.bcc), "body": m.body,
                "filename": list(m.filenames)})
    for name, values in (("to", m.to), ("cc", m.cc), ("bcc", m.bcc),
                         ("filename", m.filenames)):
        doc[f"{name}_terms"] = _distinct(w for v in values for w in snippets.words_of(v))
    every = [*doc["from_terms"], *doc["subject_terms"], *doc["to_terms"], *doc["cc_terms"],
             *doc["bcc_terms"], *doc["filename_terms"], *snippets.words_of(m.body)]
    doc["terms"] = _distinct(every)
    return doc


def _distinct(words: Iterator[str] | list[str]) -> list[str]:
    return list(dict.fromkeys(words))


def _summary(encoded: str) -> common_pb2.MessageSummary:
    return common_pb2.MessageSummary.FromString(base64.b64decode(encoded))


def _runs(operations: list[Operation]) -> Iterator[tuple[type, list[Operation]]]:
    """Consecutive operations of one kind, as one Meilisearch task each (order kept)."""
    run: list[Operation] = []
    for op in operations:
        if run and type(run[-1]) is not type(op):
            yield type(run[0]), run
            run = []
        run.append(op)
    if run:
        yield type(run[0]), run


# ---- the query tree as a filter ------------------------------------------------------

def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _filter(node: q.Node) -> str:
    if isinstance(node, q.All):
        return EVERYTHING
    if isinstance(node, q.Text):
        words = snippets.words_of(node.text)
        if not words:
            return NOTHING
        attr = f"{node.field}_terms" if node.field else "terms"
        parts = [f"{attr} = {_quote(w)}" for w in words[:-1]]
        last = words[-1]
        parts.append(f"{attr} STARTS WITH {_quote(last)}" if node.prefix
                     else f"{attr} = {_quote(last)}")
        return " AND ".join(parts)
    if isinstance(node, q.Flag):
        return f"flags = {_quote(node.name)}"
    if isinstance(node, q.In):
        if not node.folder_ids:
            return NOTHING
        return f"folder_id IN [{', '.join(_quote(f) for f in node.folder_ids)}]"
    if isinstance(node, q.DateRange | q.SizeRange):
        name = "date" if isinstance(node, q.DateRange) else "size"
        bounds = ([f"{name} >= {node.lo}"] if node.lo is not None else []) + \
                 ([f"{name} <= {node.hi}"] if node.hi is not None else [])
        return " AND ".join(bounds) or EVERYTHING
    if isinstance(node, q.Not):
        return f"NOT ({_filter(node.item)})"
    joiner = " AND " if isinstance(node, q.And) else " OR "
    return joiner.join(f"({_filter(item)})" for item in node.items)
