"""Recently looked-up users by address, for the per-message hot paths.

Each SMTP recipient and each filed copy would otherwise cost a GetUser round trip to
metadata_svc. Only found users are kept (a user created a moment ago is found at once),
for a few seconds: the quota answer at RCPT may be that old, and the store enforces the
quota again when it files the message.
"""

from __future__ import annotations

import time

from mailgrid.clients import MetadataClient
from mailgrid.v1 import common_pb2

TTL_SECONDS = 5.0
MAX_ENTRIES = 10_000


class UserCache:
    def __init__(self, metadata: MetadataClient, ttl: float = TTL_SECONDS,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.metadata = metadata
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, common_pb2.User]] = {}

    async def by_address(self, address: str) -> common_pb2.User:
        """The user at ``address`` (any case); NotFound and other errors as GetUser's."""
        key = address.lower()
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        user = await self.metadata.get_user(address=key)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude, and enough: entries live seconds anyway
        self._entries[key] = (now + self.ttl, user)
        return user
