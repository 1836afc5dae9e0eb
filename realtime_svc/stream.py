"""Reading a user's events back from the EVENTS stream (catch-up and gap filling).

The stream is the source of truth: a live message only says "this happened, at this
sequence"; whatever a feed or a session may have missed is read from here by sequence.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from mailgrid import bus
from mailgrid.errors import Unavailable

log = logging.getLogger(__name__)

STREAM = "EVENTS"


@dataclass(frozen=True)
class StoredEvent:
    """One MailEvent as the stream holds it: its sequence is the client's cursor."""

    seq: int
    payload: bytes


@dataclass(frozen=True)
class StreamState:
    first_seq: int
    last_seq: int


class EventStream:
    """The EVENTS stream, read by sequence for one user's subject at a time."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def state(self) -> StreamState:
        try:
            info = await self.js.stream_info(STREAM)
        except Exception as err:  # timeouts, no responders, connection loss
            raise Unavailable(f"cannot read the {STREAM} stream: {err}") from err
        return StreamState(first_seq=int(info.state.first_seq),
                           last_seq=int(info.state.last_seq))

    async def last_seq_of(self, user_id: str) -> int:
        """The sequence of the user's newest stored event; 0 when there is none."""
        try:
            msg = await self.js.get_msg(STREAM, subject=bus.events_subject(user_id))
        except NotFoundError:
            return 0
        except Exception as err:
            raise Unavailable(f"cannot read the {STREAM} stream: {err}") from err
        return int(msg.seq or 0)

    async def read_after(self, user_id: str, after: int,
                         upto: int | None = None) -> AsyncIterator[StoredEvent]:
        """The user's events with ``after < seq <= upto`` (to the end when ``upto`` is
        None), in order.

        One "next message on this subject" request per event: the server skips other
        users' events, so the cost is the user's own backlog, not the stream's.
        """
        subject = bus.events_subject(user_id)
        seq = after
        while upto is None or seq < upto:
            try:
                msg = await self.js.get_msg(STREAM, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                return
            except Exception as err:
                raise Unavailable(f"cannot read the {STREAM} stream: {err}") from err
            seq = int(msg.seq or 0)
            if seq <= after or (upto is not None and seq > upto):
                return
            yield StoredEvent(seq, msg.data or b"")
