"""Rebuilding the index of one user, or of every user, from metadata_svc.

For each user: forget their documents, then walk every folder page by page, fetch each
message whole and index it. Each page is fetched and applied while holding the
indexer's write lock, so no event batch interleaves with it; an event the indexer
applies afterwards is at least as new as what the page saw, or is followed by the
events that bring the message up to date again. While a user is being rebuilt their
search results are incomplete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from mailgrid.clients import MetadataClient
from mailgrid.errors import NotFound
from mailgrid.v1 import common_pb2, search_pb2
from search_svc.document import indexed_message
from search_svc.indexer import Indexer
from search_svc.ports import DeleteUser, SearchIndex, Upsert

log = logging.getLogger(__name__)

PAGE_SIZE = 200
FETCH_CONCURRENCY = 16


class Reindexer:
    def __init__(self, index: SearchIndex, indexer: Indexer, metadata: MetadataClient
                 ) -> None:
        self.index = index
        self.indexer = indexer
        self.metadata = metadata
        self.progress = search_pb2.ReindexResponse()

    async def run(self, *, user_id: str = "", address: str = ""
                  ) -> AsyncIterator[search_pb2.ReindexResponse]:
        """Rebuilds, yielding progress after each page."""
        if user_id or address:
            users = [await self.metadata.get_user(user_id=user_id, address=address)]
        else:
            users = await self._every_user()
        self.progress.users_total = len(users)
        yield self._snapshot()
        for user in users:
            self.progress.current_user = user.address
            async for _ in self._user(user):
                yield self._snapshot()
            self.progress.users_done += 1
            yield self._snapshot()
        log.info("reindexed %d users, %d messages", self.progress.users_done,
                 self.progress.messages_done)

    async def _every_user(self) -> list[common_pb2.User]:
        users: list[common_pb2.User] = []
        token = ""
        while True:
            page = await self.metadata.list_users(page_size=1000, page_token=token)
            users.extend(page.users)
            if not page.next_page_token:
                return users
            token = page.next_page_token

    async def _user(self, user: common_pb2.User) -> AsyncIterator[None]:
        folders = await self.metadata.list_folders(user.user_id)
        self.progress.messages_total += sum(f.total for f in folders)
        async with self.indexer.write_lock:
            await self.index.apply([DeleteUser(user.user_id)], await self.index.applied_seq())
        yield None
        for folder in folders:
            token = ""
            while True:
                async with self.indexer.write_lock:
                    token, count = await self._page(user.user_id, folder.folder_id, token)
                self.progress.messages_done += count
                yield None
                if not token:
                    break

    async def _page(self, user_id: str, folder_id: str, token: str) -> tuple[str, int]:
        page = await self.metadata.list_messages(user_id, folder_id, page_size=PAGE_SIZE,
                                                 page_token=token)
        semaphore = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(summary: common_pb2.MessageSummary) -> Upsert | None:
            async with semaphore:
                try:
                    message = await self.metadata.get_message(user_id, summary.email_id)
                except NotFound:  # deleted since the page was read
                    return None
            return Upsert(indexed_message(user_id, message, summary))

        ops = [op for op in await asyncio.gather(*map(fetch, page.messages)) if op]
        if ops:
            await self.index.apply(ops, await self.index.applied_seq())
        return page.next_page_token, len(page.messages)

    def _snapshot(self) -> search_pb2.ReindexResponse:
        copy = search_pb2.ReindexResponse()
        copy.CopyFrom(self.progress)
        return copy
