"""Fan-out of live events: one feed per user with open sessions, one queue per session.

Why this shape (measured by bench/realtime_fanout.py, `python -m bench realtime`): a
JetStream consumer per session costs the server a consumer and the client idle
heartbeats plus a flow-control poll task each, for sessions that are idle almost all
of the time. Instead, the EVENTS stream republishes every stored event on
``mail.live.<user_id>`` with its sequence (Nats-Sequence) and the previous sequence of
the same user (Nats-Last-Sequence). Each instance holds ONE core subscription per user
that has at least one open session here, shared by all of that user's sessions; an idle
session is a queue and a waiting coroutine, nothing on the server.

Core NATS may drop messages (a reconnect, a slow consumer); the previous-sequence header
shows every gap, and a gap (or a reconnect) is filled by reading the stream, so a feed
hands out every event of its user exactly once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailgrid import bus
from realtime_svc.stream import EventStream, StoredEvent

log = logging.getLogger(__name__)

SEQUENCE = "Nats-Sequence"
PREVIOUS = "Nats-Last-Sequence"


class Session:
    """One subscriber's bounded queue of live events.

    ``start`` is the feed's position when the session joined: every event after it
    reaches the queue, every event up to it must be read from the stream (catch-up).
    ``None`` in the queue means the session overflowed and was detached.
    """

    def __init__(self, user_id: str, limit: int) -> None:
        self.user_id = user_id
        self.limit = max(1, limit)
        self.start = 0
        self.queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue()
        self.overflowed = False

    def offer(self, event: StoredEvent) -> bool:
        """Queues ``event``; False (and the end-of-session marker) once it is full."""
        if self.overflowed:
            return False
        if self.queue.qsize() >= self.limit:
            self.overflowed = True
            while not self.queue.empty():  # what it has not read is useless now
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False
        self.queue.put_nowait(event)
        return True


class UserFeed:
    """The live events of one user on this instance, handed to each of its sessions."""

    def __init__(self, nc: NATS, stream: EventStream, user_id: str) -> None:
        self.nc = nc
        self.stream = stream
        self.user_id = user_id
        self.sessions: set[Session] = set()
        self.last_seq = 0
        self.ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribes, then reads where the user's events stand: a live message that
        raced the read is either older (skipped) or newer (kept)."""
        self._sub = await self.nc.subscribe(bus.live_subject(self.user_id),
                                            cb=self._on_message)
        await self.nc.flush()  # the server has the subscription before we look
        self.last_seq = await self.stream.last_seq_of(self.user_id)
        self.ready.set()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):  # connection already closed
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        await self.ready.wait()
        headers = msg.headers or {}
        try:
            seq = int(headers[SEQUENCE])
            previous = int(headers.get(PREVIOUS, "0"))
        except (KeyError, ValueError):
            log.warning("live event for %s without a sequence; ignored", self.user_id)
            return
        async with self._lock:
            if seq <= self.last_seq:
                return  # already handed out (read from the stream while filling a gap)
            if previous > self.last_seq:
                log.info("gap in live events of %s (%d..%d); reading the stream",
                         self.user_id, self.last_seq + 1, previous)
                await self._fill()
            if seq > self.last_seq:
                self._deliver(StoredEvent(seq, msg.data))

    async def recheck(self) -> None:
        """Reads whatever the stream holds beyond our position (after a reconnect, live
        messages sent while we were away are lost for good on core NATS)."""
        if not self.ready.is_set():
            return
        async with self._lock:
            await self._fill()

    async def _fill(self) -> None:
        try:
            async for event in self.stream.read_after(self.user_id, self.last_seq):
                self._deliver(event)
        except Exception as err:
            # Nothing is lost: the next live message shows the gap again.
            log.warning("could not fill the live events of %s: %s", self.user_id, err)

    def _deliver(self, event: StoredEvent) -> None:
        self.last_seq = event.seq
        for session in list(self.sessions):
            if not session.offer(event):
                log.info("a session of %s fell %d events behind; told to resync",
                         self.user_id, session.limit)
                self.sessions.discard(session)


class Hub:
    """Every feed of this instance; ``attach`` gives a session, ``detach`` ends it."""

    def __init__(self, nc: NATS, stream: EventStream, session_buffer: int) -> None:
        self.nc = nc
        self.stream = stream
        self.session_buffer = session_buffer
        self.feeds: dict[str, UserFeed] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}

    @property
    def session_count(self) -> int:
        return sum(len(feed.sessions) for feed in self.feeds.values())

    async def attach(self, user_id: str) -> Session:
        """A new session of ``user_id``, its ``start`` set to the feed's position."""
        session = Session(user_id, self.session_buffer)
        feed = self.feeds.get(user_id)
        if feed is None:
            feed = self.feeds[user_id] = UserFeed(self.nc, self.stream, user_id)
            self._starting[user_id] = asyncio.create_task(self._start(feed))
        feed.sessions.add(session)
        starting = self._starting.get(user_id)
        try:
            if starting is not None:
                # Shielded: one attacher giving up must not cancel the others' start.
                await asyncio.shield(starting)
        except BaseException:
            await self.detach(session)
            raise
        # No await between the feed's position and the session's start: every later
        # event is queued for it, every earlier one is its catch-up's.
        session.start = feed.last_seq
        return session

    async def _start(self, feed: UserFeed) -> None:
        try:
            await feed.start()
        except BaseException:
            self._forget(feed)
            await feed.close()
            raise
        finally:
            # Only our own entry: a newer feed of the same user may be starting already.
            if self._starting.get(feed.user_id) is asyncio.current_task():
                del self._starting[feed.user_id]
        if not feed.sessions:  # every attacher gave up while it started
            self._forget(feed)
            await feed.close()

    async def detach(self, session: Session) -> None:
        feed = self.feeds.get(session.user_id)
        if feed is None:
            return
        feed.sessions.discard(session)
        if not feed.sessions and session.user_id not in self._starting:
            self._forget(feed)
            await feed.close()

    def _forget(self, feed: UserFeed) -> None:
        if self.feeds.get(feed.user_id) is feed:
            del self.feeds[feed.user_id]

    async def recheck_all(self) -> None:
        """After a NATS reconnect: every feed reads what it may have missed."""
        feeds = list(self.feeds.values())
        log.info("NATS reconnected: checking %d live feeds for missed events", len(feeds))
        await asyncio.gather(*(feed.recheck() for feed in feeds), return_exceptions=True)

    async def close(self) -> None:
        feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            for session in feed.sessions:
                session.queue.put_nowait(None)
            await feed.close()
