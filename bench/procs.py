"""CPU and memory of a whole server process tree, including processes that come and go.

CPU: for every live process of the tree, its own user+system time plus the time of the
children it has already reaped (``children_user``/``children_system``: the kernel adds a
child's times to its parent when the parent waits for it). Summed over the tree at two
instants, the difference is the CPU the tree spent in between, short-lived children
(Postfix's smtpd, cleanup, virtual) included, provided they are reaped by a member of the
tree (Postfix's master reaps its children; `mailgrid up` reaps its services).

Memory: the sum of the RSS of the live processes, sampled every ``interval`` seconds on a
background thread; the peak is the largest sample. RSS counts shared pages (libc, the
binary's text) once per process, which overstates a tree of many small processes such as
Postfix's 20 smtpd + 20 cleanup + virtual; so the proportional set size (PSS: each shared
page divided among its sharers, /proc/PID/smaps_rollup) is sampled too, less often since
it costs more to read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil


def tree(roots: Iterable[int]) -> list[psutil.Process]:
    """The root processes and all their live descendants, each once."""
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in members:
            found.setdefault(proc.pid, proc)
    return list(found.values())


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    total = 0.0
    for proc in tree(roots):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue  # exited between the listing and now: its parent reaps its times
        total += times.user + times.system + times.children_user + times.children_system
    return total


def tree_cpu_by_process(roots: Iterable[int], name: Callable[[psutil.Process], str]
                        ) -> dict[str, float]:
    """CPU seconds per process name; the children a process has reaped count under
    "NAME: exited children" (Postfix's master reaps smtpd, cleanup, virtual, ...)."""
    out: dict[str, float] = {}
    for proc in tree(roots):
        try:
            times = proc.cpu_times()
            key = name(proc)
        except psutil.Error:
            continue
        out[key] = out.get(key, 0.0) + times.user + times.system
        if reaped := times.children_user + times.children_system:
            out[f"{key}: exited children"] = (out.get(f"{key}: exited children", 0.0)
                                              + reaped)
    return out


def tree_rss_bytes(roots: Iterable[int]) -> int:
    total = 0
    for proc in tree(roots):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def tree_rss_by_process(roots: Iterable[int], name: Callable[[psutil.Process], str]
                        ) -> dict[str, int]:
    """RSS bytes per process name (processes of one name summed)."""
    out: dict[str, int] = {}
    for proc in tree(roots):
        try:
            rss = proc.memory_info().rss
            key = name(proc)
        except psutil.Error:
            continue
        out[key] = out.get(key, 0) + rss
    return out


def tree_pss_bytes(roots: Iterable[int]) -> int:
    total = 0
    for proc in tree(roots):
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total


@dataclass
class TreeMeter:
    """Measures a process tree between ``start()`` and ``stop()``: CPU seconds spent and
    the peak RSS of the sampled tree."""

    roots: list[int]
    # Names processes for the per-process CPU breakdown (None: no breakdown).
    namer: Callable[[psutil.Process], str] | None = None
    interval: float = 0.1
    # Every how many RSS samples the PSS is sampled too.
    pss_every: int = 5
    cpu_start: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    samples: int = 0
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    # Largest RSS sample of each process name (with a namer).
    peak_rss_by_process: dict[str, int] = field(default_factory=dict)
    _cpu_by_process_start: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak_rss = 0
        self._sample_rss()
        self.peak_pss = tree_pss_bytes(self.roots)
        self.samples = 1
        self.cpu_start = tree_cpu_seconds(self.roots)
        if self.namer is not None:
            self._cpu_by_process_start = tree_cpu_by_process(self.roots, self.namer)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="tree-meter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_rss()
            if self.samples % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, tree_pss_bytes(self.roots))
            self.samples += 1

    def settle(self, window: float = 0.5, quiet_share: float = 0.05,
               limit: float = 120.0, quiet_windows: int = 3) -> float:
        """Waits (measuring on) until the tree has finished the work it deferred: until
        it spends less than ``quiet_share`` of one CPU in each of ``quiet_windows``
        windows in a row, or ``limit`` seconds pass. Returns the seconds waited. Work a
        server does after the last message is delivered (e.g. indexing it for search,
        which may start a moment after the burst) is part of its cost."""
        started = time.monotonic()
        quiet = 0
        while quiet < quiet_windows and time.monotonic() - started < limit:
            before = tree_cpu_seconds(self.roots)
            time.sleep(window)
            idle = tree_cpu_seconds(self.roots) - before < quiet_share * window
            quiet = quiet + 1 if idle else 0
        return time.monotonic() - started

    def stop(self) -> None:
        """Ends the measurement; later calls change nothing."""
        if self._stop.is_set():
            return
        self.cpu_seconds = tree_cpu_seconds(self.roots) - self.cpu_start
        if self.namer is not None:
            end = tree_cpu_by_process(self.roots, self.namer)
            self.cpu_by_process = {
                key: value - self._cpu_by_process_start.get(key, 0.0)
                for key, value in sorted(end.items(), key=lambda kv: -kv[1])}
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_rss()

    def _sample_rss(self) -> None:
        if self.namer is None:
            total = tree_rss_bytes(self.roots)
        else:
            per = tree_rss_by_process(self.roots, self.namer)
            total = sum(per.values())
            for key, rss in per.items():
                self.peak_rss_by_process[key] = max(rss, self.peak_rss_by_process.get(key, 0))
        self.peak_rss = max(self.peak_rss, total)
