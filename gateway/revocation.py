"""Revoked access tokens, seen by every gateway instance.

A token names itself with a ``jti`` claim (RFC 7519 4.1.7). Logout writes that id into
the NATS KV bucket ``REVOKED_TOKENS``, whose entries live as long as a token does (the
bucket's TTL is ``token_ttl``: after that the token has expired anyway). Every gateway
watches the bucket and keeps the revoked ids in memory, so checking a token costs no
round trip and a revocation reaches the other instances within a NATS delivery.

The instance that revokes records the id locally before it answers, so its own next
request already fails; other instances follow as the watch delivers (milliseconds).
If NATS is unreachable, logout answers 503 (the revocation is not recorded and the
client should retry); checks go on against the ids already known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from mailgrid.errors import Unavailable

log = logging.getLogger(__name__)

BUCKET = "REVOKED_TOKENS"
# Seconds to wait for JetStream to store a revocation.
REVOKE_TIMEOUT = 5.0


class Revocations:
    """The set of revoked token ids, kept in step with the shared KV bucket."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self._revoked: dict[str, float] = {}   # jti → expiry (unix seconds)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, js: JetStreamContext) -> None:
        self._kv = await _bucket(js, self.ttl)
        self._watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._follow(self._watcher))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._watcher is not None:
            with contextlib.suppress(Exception):  # NATS may be gone already
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            self._watcher = None

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    async def revoke(self, jti: str, expires_at: float) -> None:
        """Records ``jti`` as revoked until ``expires_at``; Unavailable if NATS is down."""
        if self._kv is None:
            raise Unavailable("token revocation is not available")
        try:
            await asyncio.wait_for(self._kv.put(jti, str(int(expires_at)).encode()),
                                   REVOKE_TIMEOUT)
        except Exception as err:
            log.warning("revoking a token failed: %s", err)
            raise Unavailable("could not record the revocation") from None
        self._add(jti, expires_at)

    async def wait(self, jti: str) -> None:
        """Returns once ``jti`` is revoked (by this instance or another)."""
        if jti in self._revoked:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(jti, []).append(future)
        try:
            await future
        finally:
            waiting = self._waiters.get(jti, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(jti, None)

    def _add(self, jti: str, expires_at: float) -> None:
        self._revoked[jti] = expires_at
        for future in self._waiters.pop(jti, []):
            if not future.done():
                future.set_result(None)
        self._forget_expired()

    def _forget_expired(self) -> None:
        now = time.time()
        for jti in [j for j, exp in self._revoked.items() if exp < now]:
            del self._revoked[jti]

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None or entry.operation is not None:
                continue  # the end-of-history marker, or a delete/purge (expiry)
            try:
                expires_at = float((entry.value or b"0").decode())
            except ValueError:
                expires_at = time.time() + self.ttl
            self._add(entry.key, expires_at)


async def _bucket(js: JetStreamContext, ttl: int) -> KeyValue:
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=BUCKET, ttl=float(ttl), history=1,
                                         description="revoked access token ids (jti)")
