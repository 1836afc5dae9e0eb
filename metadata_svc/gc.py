"""Blob garbage collection: delete blobs that lost their last reference long enough ago.

A permanent delete releases a message's blob references; a blob left without any is
recorded as an orphan. The sweeper deletes an orphan only if (1) it was released more
than ``grace`` seconds ago, (2) it still has no reference, and (3) its file was not
written or refreshed within ``grace`` — a delivery in flight may just have put the same
bytes again (a put of existing bytes refreshes the blob) without having stored its
reference yet. Checks (2) and (3) happen in that order, and (3) is atomic with puts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mailgrid.errors import MailgridError
from metadata_svc.ports import BlobStore, MetadataStore

log = logging.getLogger(__name__)

# Orphans looked at per store query.
BATCH = 1000


class BlobCollector:
    def __init__(self, store: MetadataStore, blobs: BlobStore, grace: float,
                 interval: float) -> None:
        self.store = store
        self.blobs = blobs
        self.grace = grace
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def collect_garbage(self) -> int:
        """One sweep; returns how many blobs were deleted."""
        deleted = 0
        while True:
            cutoff = time.time() - self.grace
            keys = await self.store.orphaned_blobs(cutoff, BATCH)
            for key in keys:
                deleted += await self._collect(key, cutoff)
            if len(keys) < BATCH:
                break
        if deleted:
            log.info("blob GC deleted %d unreferenced blob(s)", deleted)
        return deleted

    async def _collect(self, key: str, cutoff: float) -> int:
        if not await self.store.claim_orphan(key, released_before=cutoff):
            return 0
        if await self.blobs.delete(key, not_written_since=cutoff):
            return 1
        if await self.blobs.exists(key):
            # Put again within the grace: maybe a delivery is about to reference it.
            # Keep it as an orphan, to be looked at again once that grace has passed.
            await self.store.note_orphan(key)
        return 0

    def start(self) -> None:
        # interval 0 turns periodic sweeps off: with several metadata_svc instances on
        # one S3 bucket, one of them sweeps (see metadata_svc/blobs_s3.py).
        if self.interval <= 0:
            return
        self._task = asyncio.create_task(self._run(), name="blob-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.collect_garbage()
            except (MailgridError, OSError) as err:
                log.warning("blob GC sweep failed, will retry: %s", err)
