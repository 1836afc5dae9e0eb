"""bus.fetch_until rides out fetch timeouts at once, whichever TimeoutError nats-py raises:
its fetch raises its own ``nats.errors.TimeoutError`` on most paths and asyncio's on some
(a batch fetch whose time ran out before its waiting pull was sent). Taken for a failure,
the second was logged as "fetch failed" and the worker slept a second (seen in the search
indexer's log)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import nats.errors
import pytest

from mailgrid import bus


class Subscription:
    """A pull subscription whose fetches have the given outcomes, in turn."""

    def __init__(self, *outcomes: list[str] | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.unsubscribed = False

    async def fetch(self, batch: int, timeout: float) -> list[str]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


async def test_either_timeout_of_a_fetch_is_ridden_out_without_a_pause(
        caplog: pytest.LogCaptureFixture) -> None:
    sub = Subscription(TimeoutError(), nats.errors.TimeoutError(), ["job"])
    stop = asyncio.Event()
    got: list[Any] = []

    async def work() -> None:
        async for msgs in bus.fetch_until(cast(Any, sub), stop, batch=2, timeout=0.1,
                                          name="test"):
            got.extend(msgs)
            stop.set()

    with caplog.at_level(logging.WARNING, logger="mailgrid.bus"):
        # A pause of a second after the first timeout would overrun this.
        await asyncio.wait_for(work(), timeout=0.9)
    assert got == ["job"] and sub.unsubscribed
    assert not [r for r in caplog.records if "fetch failed" in r.getMessage()]


async def test_other_fetch_errors_are_logged_and_waited_out(
        caplog: pytest.LogCaptureFixture) -> None:
    sub = Subscription(nats.errors.ConnectionReconnectingError(), ["job"])
    stop = asyncio.Event()
    got: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="mailgrid.bus"):
        async for msgs in bus.fetch_until(cast(Any, sub), stop, batch=2, timeout=0.1,
                                          name="test"):
            got.extend(msgs)
            stop.set()
    assert got == ["job"]
    assert [r for r in caplog.records if "test: fetch failed" in r.getMessage()]
