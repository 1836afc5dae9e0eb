"""Indexing waits for spare CPU, within a bounded delay.

Mail comes first: a message is accepted, filed and visible in its folder without the
search index, and indexing a message costs about as much CPU as filing it (search_svc
parses it again, and metadata_svc reads it back to hand it over). So while the machine
has no CPU to spare, the indexer holds the batch it fetched, and indexes it as soon as
one of these holds:

- the machine has at least ``SPARE_CORES`` of CPU to spare (counting what search_svc
  itself uses as spare: it is the work being deferred);
- the batch's oldest event is ``max_delay`` seconds old, so under a sustained load the
  index lags by that much at most, and keeps up at that lag;
- a search waits for an event not yet applied (read-your-writes): it is indexed at once.

Dovecot's FTS, Stalwart and Gmail index after delivery in the same spirit. The
indexer's CPU niceness (``search_nice``) still applies when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Half a core free: the mail path is not using the whole machine, so indexing alongside
# it slows nothing down (on two cores under a burst, the spare CPU is near zero).
SPARE_CORES = 0.5
# How often the spare CPU is measured while a batch waits.
INTERVAL = 0.2
# A measurement older than this many intervals says nothing about now.
STALE_WINDOWS = 4


@dataclass(frozen=True)
class CpuSample:
    """The machine's CPU counters and this process's CPU time at one moment."""

    total: float  # seconds of CPU time of all cores, busy or not
    idle: float  # of which idle (idle and iowait)
    own: float  # CPU seconds this process used
    cores: int


def read_proc_stat(path: Path = Path("/proc/stat")) -> tuple[float, float, int]:
    """All cores' CPU seconds and idle seconds (idle + iowait) since boot, and the core
    count, from the kernel's counters (proc(5))."""
    tick = os.sysconf("SC_CLK_TCK")
    lines = path.read_text().splitlines()
    # cpu user nice system idle iowait irq softirq steal (guest time is in user already)
    fields = [int(v) for v in lines[0].split()[1:9]]
    cores = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return sum(fields) / tick, (fields[3] + fields[4]) / tick, max(cores, 1)


class CpuMeter:
    """Spare cores between two samples: idle time plus this process's own use."""

    def __init__(self, read: Callable[[], tuple[float, float, int]] = read_proc_stat,
                 own: Callable[[], float] = time.process_time) -> None:
        self._read = read
        self._own = own

    def sample(self) -> CpuSample | None:
        """Now's counters, or None where the kernel does not offer them."""
        try:
            total, idle, cores = self._read()
        except (OSError, ValueError, IndexError):
            return None
        return CpuSample(total, idle, self._own(), cores)

    @staticmethod
    def spare_cores(before: CpuSample, after: CpuSample) -> float | None:
        """Cores left over between the samples, or None when no time passed."""
        elapsed = after.total - before.total
        if elapsed <= 0:
            return None
        spare = (after.idle - before.idle) + (after.own - before.own)
        return max(0.0, min(1.0, spare / elapsed)) * after.cores


class IndexPacer:
    """Decides when a fetched batch of events is indexed (see the module docstring)."""

    def __init__(self, max_delay: float, meter: CpuMeter | None = None,
                 interval: float = INTERVAL) -> None:
        self.max_delay = max_delay
        self.meter = meter or CpuMeter()
        self.interval = interval
        self._last: CpuSample | None = None
        self.deferred_batches = 0

    async def wait(self, oldest: dt.datetime | None, demand: asyncio.Event,
                   stop: asyncio.Event) -> None:
        """Returns when a batch whose oldest event was stored at ``oldest`` is to be
        indexed; at once once ``demand`` or ``stop`` is set."""
        if self.max_delay <= 0:
            return
        deadline = self._deadline(oldest)
        waited = False
        while not (demand.is_set() or stop.is_set()):
            if self._has_spare() or time.monotonic() >= deadline:
                break
            waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(demand, stop),
                                       timeout=max(0.0, min(self.interval,
                                                            deadline - time.monotonic())))
        if waited:
            self.deferred_batches += 1

    def _deadline(self, oldest: dt.datetime | None) -> float:
        """The monotonic time the batch is due: ``max_delay`` after its oldest event, and
        never later than ``max_delay`` from now (a NATS server whose clock runs ahead
        must not hold the index back longer)."""
        now = time.monotonic()
        if oldest is None:
            return now + self.max_delay
        age = (dt.datetime.now(dt.UTC) - oldest).total_seconds()
        return now + min(self.max_delay, max(0.0, self.max_delay - age))

    def _has_spare(self) -> bool:
        """Whether the machine had CPU to spare over the last ``interval`` or so. Counters
        the kernel does not offer say yes (indexing is never held back on a guess); a
        window too short or too old to tell says no, and starts a new one."""
        sample = self.meter.sample()
        if sample is None:
            return True
        last = self._last
        if last is None or _window(last, sample) > STALE_WINDOWS * self.interval:
            self._last = sample
            return False
        if _window(last, sample) < self.interval / 2:
            return False
        self._last = sample
        return (CpuMeter.spare_cores(last, sample) or 0.0) >= SPARE_CORES


def _window(before: CpuSample, after: CpuSample) -> float:
    """Wall-clock seconds between two samples, by the kernel's counters."""
    return (after.total - before.total) / after.cores


async def _either(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
