"""RealtimeService over gRPC: one user's events after a cursor, then live.

Order of a stream: the stored events after ``since`` (catch-up, read from the EVENTS
stream), one ``ready``, then live events from the user's feed; a ``heartbeat`` when
nothing happened for a while. The cursor of each response is the EVENTS sequence up to
which the client is complete, so resuming with it misses and repeats nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mailgrid.errors import InvalidArgument
from mailgrid.grpcutil import rpc_stream
from mailgrid.v1 import events_pb2, realtime_pb2, realtime_pb2_grpc
from realtime_svc.hub import Hub, Session
from realtime_svc.stream import StoredEvent

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
MAX_USER_ID = 200


def _resync(cursor: int, reason: realtime_pb2.ResyncReason.ValueType,
            detail: str) -> realtime_pb2.SubscribeResponse:
    return realtime_pb2.SubscribeResponse(
        cursor=cursor, resync=realtime_pb2.Resync(reason=reason, detail=detail))


def _event(stored: StoredEvent, user_id: str) -> realtime_pb2.SubscribeResponse | None:
    event = events_pb2.MailEvent()
    try:
        event.ParseFromString(stored.payload)
    except DecodeError:
        log.error("unreadable event %d of %s skipped", stored.seq, user_id)
        return None
    return realtime_pb2.SubscribeResponse(cursor=stored.seq, event=event)


def _check_user_id(user_id: str) -> None:
    # The id is one token of a NATS subject: no wildcards, dots or spaces.
    if (not user_id or len(user_id) > MAX_USER_ID
            or any(c in user_id for c in ".*> \t\r\n")):
        raise InvalidArgument("user_id must be a user id")


class RealtimeServicer(realtime_pb2_grpc.RealtimeServiceServicer):
    def __init__(self, hub: Hub, heartbeat: float) -> None:
        self.hub = hub
        self.heartbeat = heartbeat if heartbeat > 0 else None

    @rpc_stream
    async def Subscribe(
        self, request: realtime_pb2.SubscribeRequest, context: Context,
    ) -> AsyncIterator[realtime_pb2.SubscribeResponse]:
        user_id = request.user_id
        _check_user_id(user_id)
        state = await self.hub.stream.state()
        since = request.since if request.HasField("since") else state.last_seq
        if since > state.last_seq:
            yield _resync(state.last_seq, realtime_pb2.RESYNC_REASON_CURSOR_UNKNOWN,
                          f"cursor {since} is ahead of the event stream ({state.last_seq})")
            return
        if since + 1 < state.first_seq:
            yield _resync(state.last_seq, realtime_pb2.RESYNC_REASON_CURSOR_EXPIRED,
                          f"events after {since} are no longer kept "
                          f"(the oldest is {state.first_seq})")
            return
        session = await self.hub.attach(user_id)
        try:
            async for response in self._session(session, since):
                yield response
        finally:
            await self.hub.detach(session)

    async def _session(self, session: Session, since: int
                       ) -> AsyncIterator[realtime_pb2.SubscribeResponse]:
        cursor = since
        async for stored in self.hub.stream.read_after(session.user_id, since, session.start):
            response = _event(stored, session.user_id)
            cursor = stored.seq
            if response is not None:
                yield response
        cursor = max(cursor, session.start)
        yield realtime_pb2.SubscribeResponse(cursor=cursor, ready=realtime_pb2.Ready())
        while True:
            try:
                live = await asyncio.wait_for(session.queue.get(), self.heartbeat)
            except TimeoutError:
                yield realtime_pb2.SubscribeResponse(
                    cursor=cursor, heartbeat=realtime_pb2.Heartbeat())
                continue
            if live is None:
                if session.overflowed:
                    head = (await self.hub.stream.state()).last_seq
                    yield _resync(head, realtime_pb2.RESYNC_REASON_TOO_SLOW,
                                  f"more than {session.limit} events behind")
                return
            if live.seq <= cursor:
                continue
            cursor = live.seq
            response = _event(live, session.user_id)
            if response is not None:
                yield response
