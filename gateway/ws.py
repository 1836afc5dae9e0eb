"""Live mailbox events over HTTP: a WebSocket, and a long-poll fallback.

``GET /v1/events?since=CURSOR`` (WebSocket) bridges realtime_svc's Subscribe stream as
one JSON text message per event; ``GET /v1/events/poll?since=CURSOR&timeout=S`` returns
the events after ``since`` for clients that cannot hold a WebSocket.

Every message has a ``cursor`` (opaque: a string of digits) and a ``type``:
- ``message_added`` (``message``: a folder-listing row as GET /v1/folders/{id}/messages
  gives it), ``message_updated`` (``message`` and ``previous_folder_id``, set when it
  moved), ``message_deleted`` (``email_id``, ``folder_id``, ``permanent``); each with
  ``folders``: the folders whose counts changed, as GET /v1/folders gives them.
- ``ready``: the catch-up after ``since`` is done, what follows is live.
- ``heartbeat``: nothing happened for a while (every ``events_heartbeat`` seconds).
- ``resync`` (``reason``: cursor_expired, cursor_unknown or too_slow; ``detail``):
  reload the mailbox, then subscribe again with this cursor. The WebSocket then closes
  with 4409.
Pass the cursor of the last message received as ``since`` to resume: nothing is missed
and nothing repeated. Without ``since``, only new events come (load the mailbox after
``ready``). Subscribe first, then load the mailbox: an event is never lost in between.

Authentication: ``Authorization: Bearer TOKEN`` on the handshake, or, for browsers
(which cannot set headers on a WebSocket), a first message ``{"token": "TOKEN"}`` within
AUTH_TIMEOUT seconds. A missing or bad token closes the socket with 4401; so does the
token's expiry, when it comes. Tokens are stateless JWTs and there is no revocation yet:
a logout cannot end a stream before the token expires.

Cross-site WebSocket hijacking: a browser sends ``Origin`` on every WebSocket handshake
(RFC 6455 10.2) and attaches the site's cookies; we use no cookies, but still refuse
foreign origins (403 on the handshake): only ``events_allowed_origins``, or by default
the host the browser connected to. Clients that are not browsers send no Origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

from gateway.auth import Claims, TokenSigner
from gateway.http_api import FolderOut, User, role_name, summary_out
from gateway.revocation import Revocations
from mailgrid.errors import InvalidArgument, MailgridError, Unauthenticated, Unavailable
from mailgrid.grpcutil import stream
from mailgrid.v1 import common_pb2, realtime_pb2, realtime_pb2_grpc

log = logging.getLogger(__name__)

# Seconds a client has to send its {"token": ...} message.
AUTH_TIMEOUT = 10.0
# Seconds the gateway keeps trying to reach realtime_svc again (it restarts, or another
# instance takes over) before it gives up and closes with 1013 (try again later).
RECONNECT_FOR = 30.0
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 1.0
# Long poll: the longest wait allowed, and the most events one answer carries.
POLL_MAX_TIMEOUT = 60.0
POLL_MAX_EVENTS = 500
# After the first live event, a poll waits this long for more of the same burst.
POLL_LINGER = 0.02
# Seconds a poll waits for the catch-up (the stored events after since) in any case.
POLL_CATCH_UP = 10.0
MAX_CURSOR_DIGITS = 20  # a uint64

# WebSocket close codes (RFC 6455 7.4.2: 4000-4999 are ours).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_BAD_REQUEST = 4400
CLOSE_RESYNC = 4409
CLOSE_TRY_AGAIN = 1013
CLOSE_POLICY = 1008

_RESYNC_REASON = {
    realtime_pb2.RESYNC_REASON_CURSOR_EXPIRED: "cursor_expired",
    realtime_pb2.RESYNC_REASON_CURSOR_UNKNOWN: "cursor_unknown",
    realtime_pb2.RESYNC_REASON_TOO_SLOW: "too_slow",
}
# gRPC failures after which the stream is resumed from its cursor.
_TRANSIENT = (Unavailable,)


class RealtimeClient:
    """The gateway's side of RealtimeService."""

    def __init__(self, addr: str) -> None:
        self._channel = grpc.aio.insecure_channel(addr, options=[
            ("grpc.keepalive_time_ms", 30_000),
            # realtime_svc restarts in about a second: find it again just as fast.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._stub = realtime_pb2_grpc.RealtimeServiceStub(self._channel)

    @contextlib.asynccontextmanager
    async def subscribe(self, user_id: str, since: int | None
                        ) -> AsyncIterator[AsyncIterator[realtime_pb2.SubscribeResponse]]:
        """The user's stream; the call is cancelled when the block is left."""
        request = realtime_pb2.SubscribeRequest(user_id=user_id)
        if since is not None:
            request.since = since
        call: Any = self._stub.Subscribe(request)
        try:
            yield stream(call)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class EventsDeps:
    realtime: RealtimeClient
    signer: TokenSigner
    # Allowed Origin values (scheme://host[:port], lower case); empty: same host.
    allowed_origins: Sequence[str] = ()
    # Revoked token ids: a session ends when its token is revoked (logout).
    revocations: Revocations | None = None


# ---- JSON shapes ----------------------------------------------------------------------

def _folder(f: common_pb2.Folder) -> dict[str, Any]:
    return FolderOut(id=f.folder_id, name=f.name, role=role_name(f.role), total=f.total,
                     unread=f.unread).model_dump(mode="json")


def _summary(s: common_pb2.MessageSummary) -> dict[str, Any]:
    return summary_out(s).model_dump(mode="json", by_alias=True)


def event_json(response: realtime_pb2.SubscribeResponse) -> dict[str, Any]:
    """One SubscribeResponse as the JSON object a client receives."""
    out: dict[str, Any] = {"cursor": str(response.cursor)}
    kind = response.WhichOneof("kind")
    if kind == "resync":
        out.update(type="resync", reason=_RESYNC_REASON.get(response.resync.reason, "unknown"),
                   detail=response.resync.detail)
        return out
    if kind != "event":
        out["type"] = kind or "heartbeat"
        return out
    event = response.event
    which = event.WhichOneof("kind") or "unknown"
    out["type"] = which
    if which == "message_added":
        out["message"] = _summary(event.message_added.message)
    elif which == "message_updated":
        out["message"] = _summary(event.message_updated.message)
        out["previous_folder_id"] = event.message_updated.previous_folder_id or None
    elif which == "message_deleted":
        deleted = event.message_deleted
        out.update(email_id=deleted.email_id, folder_id=deleted.folder_id,
                   permanent=deleted.permanent)
    out["folders"] = [_folder(f) for f in event.folders]
    return out


def parse_cursor(since: str) -> int | None:
    """'' → None (new events only); digits → the cursor; anything else is invalid."""
    since = since.strip()
    if not since:
        return None
    if not since.isdigit() or len(since) > MAX_CURSOR_DIGITS or int(since) >= 2**64:
        raise InvalidArgument("since must be a cursor from an earlier event")
    return int(since)


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """RFC 6454 origins: exactly one of ``allowed``, or (none configured) an http(s)
    origin whose host[:port] is the Host the browser connected to."""
    if origin is None:
        return True  # not a browser (browsers always send it on a WebSocket handshake)
    origin = origin.strip().rstrip("/").lower()
    if allowed:
        return origin in allowed
    parts = urllib.parse.urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and \
        parts.netloc == (host or "").strip().lower()


# ---- the WebSocket --------------------------------------------------------------------

class _Closed(Exception):
    """Ends a bridge with a WebSocket close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def _bearer(websocket: WebSocket) -> str:
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    try:
        first = await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT)
        token = json.loads(first).get("token")
    except TimeoutError:
        raise _Closed(CLOSE_UNAUTHENTICATED, "no token: send {\"token\": ...} first") from None
    except (ValueError, AttributeError, KeyError):
        raise _Closed(CLOSE_UNAUTHENTICATED, "the first message must be {\"token\": ...}"
                      ) from None
    if not isinstance(token, str) or not token:
        raise _Closed(CLOSE_UNAUTHENTICATED, "the first message must be {\"token\": ...}")
    return token


async def _authenticate(websocket: WebSocket, signer: TokenSigner) -> Claims:
    token = await _bearer(websocket)
    try:
        return signer.claims(token)
    except Unauthenticated as err:
        raise _Closed(CLOSE_UNAUTHENTICATED, err.detail) from None


async def _pump(websocket: WebSocket, realtime: RealtimeClient, user_id: str,
                since: int | None) -> None:
    """Forwards the user's events; resumes from the last cursor if realtime_svc goes
    away (restart, another instance), so the client sees one unbroken stream."""
    cursor = since
    loop = asyncio.get_running_loop()
    failing_since: float | None = None
    delay = RECONNECT_FIRST
    while True:
        try:
            async with realtime.subscribe(user_id, cursor) as responses:
                async for response in responses:
                    failing_since, delay = None, RECONNECT_FIRST
                    cursor = response.cursor
                    await websocket.send_text(json.dumps(event_json(response)))
                    if response.WhichOneof("kind") == "resync":
                        raise _Closed(CLOSE_RESYNC, "resync: reload, then resume")
        except _TRANSIENT as err:
            # Once per outage: every open session of the gateway goes through here.
            log.log(logging.INFO if failing_since is None else logging.DEBUG,
                    "event stream of %s interrupted (%s); resuming", user_id, err)
        except MailgridError as err:
            log.warning("event stream of %s failed: %s", user_id, err)
            raise _Closed(1011, "internal error") from None
        now = loop.time()
        failing_since = failing_since if failing_since is not None else now
        if now - failing_since > RECONNECT_FOR:
            raise _Closed(CLOSE_TRY_AGAIN, "live events are unavailable; try again later")
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def _drain_client(websocket: WebSocket) -> None:
    """Reads (and ignores) what the client sends, until it closes."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _revoked(revocations: Revocations | None, jti: str) -> None:
    """Ends the session when its token is revoked, on this gateway or another."""
    if revocations is None or not jti:
        await asyncio.Future()  # never revoked
        return
    await revocations.wait(jti)
    raise _Closed(CLOSE_UNAUTHENTICATED, "the access token has been revoked")


async def _expire(expires_at: float) -> None:
    await asyncio.sleep(max(0.0, expires_at - time.time()))
    raise _Closed(CLOSE_UNAUTHENTICATED, "the access token has expired")


async def bridge(websocket: WebSocket, deps: EventsDeps, since: str) -> None:
    """One WebSocket session, from handshake to close."""
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"),
                          deps.allowed_origins):
        await websocket.close(CLOSE_POLICY, "origin not allowed")  # before accept: 403
        return
    await websocket.accept()
    try:
        try:
            cursor = parse_cursor(since)
        except InvalidArgument as err:
            raise _Closed(CLOSE_BAD_REQUEST, err.detail) from None
        claims = await _authenticate(websocket, deps.signer)
        tasks = [
            asyncio.create_task(_pump(websocket, deps.realtime, claims.user_id, cursor)),
            asyncio.create_task(_drain_client(websocket)),
            asyncio.create_task(_expire(claims.expires_at)),
            asyncio.create_task(_revoked(deps.revocations, claims.jti)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # raises _Closed, or the client has gone
    except _Closed as closed:
        with contextlib.suppress(Exception):  # the client may be gone already
            await websocket.close(closed.code, closed.reason)
    except WebSocketDisconnect:
        pass


# ---- routes ---------------------------------------------------------------------------

class EventBatch(BaseModel):
    events: list[dict[str, Any]]
    cursor: str | None


def events_router(deps: EventsDeps) -> APIRouter:
    router = APIRouter(tags=["events"])

    @router.websocket("/events")
    async def events(websocket: WebSocket, since: str = "") -> None:
        await bridge(websocket, deps, since)

    @router.get("/events/poll", responses={
        401: {"description": "Missing, invalid or expired token"},
        503: {"description": "Live events are unavailable"},
    })
    async def poll(
        user: User,
        since: Annotated[str, Query(max_length=40)] = "",
        timeout: Annotated[float, Query(ge=0, le=POLL_MAX_TIMEOUT)] = 25.0,
    ) -> EventBatch:
        """The events after ``since`` (the WebSocket's JSON shapes), waiting up to
        ``timeout`` seconds for the first; pass ``cursor`` back as ``since``."""
        return await _poll(deps.realtime, user, parse_cursor(since), timeout)

    return router


async def _poll(realtime: RealtimeClient, user_id: str, since: int | None,
                timeout: float) -> EventBatch:
    events: list[dict[str, Any]] = []
    cursor = since
    live = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with realtime.subscribe(user_id, since) as responses:
        while len(events) < POLL_MAX_EVENTS:
            if not live:  # the catch-up is read whatever the timeout (timeout=0 works)
                wait = max(deadline - loop.time(), POLL_CATCH_UP)
            elif events:  # the first live event came: only the rest of its burst
                wait = POLL_LINGER
            else:
                wait = deadline - loop.time()
            try:
                response = await asyncio.wait_for(anext(responses), max(wait, 0.0))
            except (TimeoutError, StopAsyncIteration):
                break
            kind = response.WhichOneof("kind")
            cursor = response.cursor
            if kind == "ready":
                live = True
                continue
            if kind == "heartbeat":
                continue
            events.append(event_json(response))
            if kind == "resync":
                break
    return EventBatch(events=events, cursor=None if cursor is None else str(cursor))
