"""search_svc.pacing: indexing waits for spare CPU, at most ``max_delay``, never for a search.

The decisions are tested against a machine whose counters the test sets (a busy machine
cannot be had on demand otherwise); the meter itself against the real kernel, with
every core kept busy by child processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

from search_svc.pacing import SPARE_CORES, CpuMeter, CpuSample, IndexPacer, read_proc_stat

INTERVAL = 0.05


class Machine:
    """CPU counters that advance with the clock, ``idle_share`` of them idle."""

    def __init__(self, cores: int = 2, idle_share: float = 0.0) -> None:
        self.cores = cores
        self.idle_share = idle_share
        self._at = time.monotonic()
        self._total = self._idle = 0.0

    def read(self) -> tuple[float, float, int]:
        now = time.monotonic()
        elapsed, self._at = (now - self._at) * self.cores, now
        self._total += elapsed
        self._idle += elapsed * self.idle_share
        return self._total, self._idle, self.cores


def pacer(machine: Machine, max_delay: float = 0.6) -> IndexPacer:
    return IndexPacer(max_delay, CpuMeter(machine.read, own=lambda: 0.0), interval=INTERVAL)


def utc_ago(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)


async def timed_wait(p: IndexPacer, oldest: dt.datetime | None,
                     demand: asyncio.Event | None = None) -> float:
    started = time.monotonic()
    await p.wait(oldest, demand or asyncio.Event(), asyncio.Event())
    return time.monotonic() - started


def test_spare_cores_are_the_idle_time_and_the_process_own_use() -> None:
    before = CpuSample(total=100.0, idle=40.0, own=5.0, cores=4)
    # Four cores for one second: 0.5 s idle, 1.5 s used by this process.
    after = CpuSample(total=104.0, idle=40.5, own=6.5, cores=4)
    assert CpuMeter.spare_cores(before, after) == pytest.approx(2.0)
    assert CpuMeter.spare_cores(after, after) is None


async def test_a_busy_machine_holds_a_batch_until_its_oldest_event_is_max_delay_old() -> None:
    waited = await timed_wait(pacer(Machine(idle_share=0.0), max_delay=0.6), utc_ago(0))
    assert 0.55 <= waited < 2.0
    p = pacer(Machine(idle_share=0.1), max_delay=0.6)  # 0.2 cores spare: still busy
    assert 0.35 <= await timed_wait(p, utc_ago(0.2)) < 2.0
    assert p.deferred_batches == 1


class Counters:
    """CPU counters the test moves by hand."""

    def __init__(self, cores: int = 2) -> None:
        self.cores = cores
        self.total = self.idle = 0.0

    def advance(self, seconds: float, idle_share: float) -> None:
        self.total += seconds * self.cores
        self.idle += seconds * self.cores * idle_share

    def read(self) -> tuple[float, float, int]:
        return self.total, self.idle, self.cores


def test_a_window_too_short_to_tell_is_not_taken_for_spare_cpu() -> None:
    # The kernel counts CPU time in ticks of about 10 ms: over a few milliseconds a busy
    # machine can look all idle. Such a window says nothing, and the next measurement
    # still starts where the last full one ended.
    counters = Counters()
    p = IndexPacer(10.0, CpuMeter(counters.read, own=lambda: 0.0), interval=0.2)
    assert p._has_spare() is False  # the first sample only opens a window
    counters.advance(0.01, idle_share=1.0)
    assert p._has_spare() is False
    counters.advance(0.2, idle_share=0.0)  # 0.21 s since the window opened, 0.1 core idle
    assert p._has_spare() is False
    counters.advance(0.2, idle_share=1.0)
    assert p._has_spare() is True


async def test_an_event_older_than_max_delay_is_indexed_at_once() -> None:
    assert await timed_wait(pacer(Machine(), max_delay=0.6), utc_ago(5)) < 0.05


async def test_a_clock_running_ahead_does_not_hold_a_batch_longer_than_max_delay() -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert await timed_wait(pacer(Machine(), max_delay=0.3), future) < 1.5


async def test_spare_cpu_lets_the_batch_go_within_a_few_measurements() -> None:
    machine = Machine(cores=2, idle_share=SPARE_CORES / 2 + 0.05)  # just over half a core
    assert await timed_wait(pacer(machine, max_delay=10), utc_ago(0)) < 1.0


async def test_a_machine_that_becomes_idle_lets_the_batch_go() -> None:
    machine = Machine(idle_share=0.0)
    p = pacer(machine, max_delay=10)

    async def calm_down() -> None:
        await asyncio.sleep(0.3)
        machine.idle_share = 0.9

    calm = asyncio.create_task(calm_down())
    waited = await timed_wait(p, utc_ago(0))
    await calm
    assert 0.3 <= waited < 1.5


async def test_a_waiting_search_lets_the_batch_go_at_once() -> None:
    demand = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, demand.set)
    assert await timed_wait(pacer(Machine(), max_delay=10), utc_ago(0), demand) < 1.0
    # Already set: not held at all.
    assert await timed_wait(pacer(Machine(), max_delay=10), utc_ago(0), demand) < 0.05


async def test_max_delay_zero_never_holds_and_unreadable_counters_never_hold() -> None:
    assert await timed_wait(pacer(Machine(), max_delay=0), utc_ago(0)) < 0.05

    def unreadable() -> tuple[float, float, int]:
        raise OSError("no /proc here")

    p = IndexPacer(10, CpuMeter(unreadable), interval=INTERVAL)
    assert await timed_wait(p, utc_ago(0)) < 0.05
    assert p.deferred_batches == 0


def test_the_kernel_counters_are_read() -> None:
    total, idle, cores = read_proc_stat()
    assert 0 < idle < total
    assert cores == len(Path("/proc/stat").read_text().split("\ncpu")) - 1 >= 1


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_the_meter_sees_every_core_busy_and_then_idle_again() -> None:
    meter = CpuMeter()
    cores = read_proc_stat()[2]
    spinners = [multiprocessing.Process(target=_spin, args=(1.5,)) for _ in range(cores)]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(0.3)  # every spinner running
        before = meter.sample()
        time.sleep(0.6)
        after = meter.sample()
    finally:
        for spinner in spinners:
            spinner.join()
    assert before is not None and after is not None
    busy = CpuMeter.spare_cores(before, after)
    assert busy is not None and busy < SPARE_CORES
    # The spinners are gone: most of the machine is idle again.
    before = meter.sample()
    time.sleep(0.6)
    after = meter.sample()
    assert before is not None and after is not None
    idle = CpuMeter.spare_cores(before, after)
    assert idle is not None and idle >= SPARE_CORES, os.getloadavg()
