"""Recently looked-up users by address, for the per-message hot paths.

Each SMTP recipient and each filed copy would otherwise cost a GetUser round trip to
metadata_svc. Only found users are kept (a user created a moment ago is found at once),
for a few seconds: the quota answer at RCPT may be that old, and the store enforces the
quota again when it files the message.
"""

from __future__ import annotations

from mailgrid.clients import MetadataClient
from mailgrid.ttlcache import TtlCache
from mailgrid.v1 import common_pb2

TTL_SECONDS = 5.0


class UserCache:
    def __init__(self, metadata: MetadataClient, ttl: float = TTL_SECONDS) -> None:
        self.metadata = metadata
        self._users: TtlCache[str, common_pb2.User] = TtlCache(ttl)

    async def by_address(self, address: str) -> common_pb2.User:
        """The user at ``address`` (any case); NotFound and other errors as GetUser's."""
        key = address.lower()
        user = self._users.get(key)
        if user is None:
            user = await self.metadata.get_user(address=key)
            self._users.put(key, user)
        return user
