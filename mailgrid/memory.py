"""What a service's C heap (glibc malloc) does with the memory it frees.

Mail moves in large buffers: each service copies a 100 KB message a few times, and
batches of messages are joined into payloads of megabytes. With glibc's defaults, a
buffer that size is mapped for itself (mmap) or trimmed off the top of the heap as soon
as it is freed, so the next message faults each of its pages in again and the kernel
zeroes every one: about 3 µs a page on the benchmark machine, some 280 faults per 100 KB
message across the services, about a seventh of all their CPU (docs/PERFORMANCE.md).

``keep_freed_memory`` makes a service keep up to ``keep_bytes`` of freed heap for reuse
instead, and ``return_freed_memory`` hands what it kept back to the OS (malloc_trim)
once the service has been quiet for an interval: what a burst needed goes back soon
after the burst, and never in the middle of one (a return during a burst is paid
for with the very faults the kept heap saves). Both do nothing where the C library is
not glibc.

One trim is not ours: protobuf's upb allocator calls malloc_trim(0) itself after every
10,000 arena blocks it frees, so a service that makes many protobuf messages still
returns its kept heap every few hundred mail messages (about 35 faults per 100 KB
message remain in metadata_svc, delivery_svc and search_svc; the gateway, which makes
few, is down to one or two).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import sys
import time

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
# A process that used less than this share of one CPU over an interval is quiet.
QUIET_CPU_SHARE = 0.05


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # musl and others have no mallopt/malloc_trim
        return None
    return libc


def keep_freed_memory(keep_bytes: int) -> bool:
    """Keeps up to ``keep_bytes`` of freed heap, and allocates buffers of up to
    MMAP_THRESHOLD_MAX from the heap (so they are reused); True if glibc took both."""
    libc = _glibc()
    if libc is None or keep_bytes <= 0:
        return False
    mmap_threshold = min(keep_bytes, MMAP_THRESHOLD_MAX)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(M_TRIM_THRESHOLD, keep_bytes))


async def return_freed_memory(interval: float) -> None:
    """Returns the freed heap this process kept to the OS once the process has been
    quiet (used under QUIET_CPU_SHARE of a CPU) for ``interval`` seconds in a row; once
    per quiet spell. Checked every second at most, so a burst that starts just before a
    check is seen at once rather than an interval later."""
    libc = _glibc()
    if libc is None or interval <= 0:
        return
    tick = min(interval, 1.0)
    quiet_for, returned = 0.0, False
    used = time.process_time()
    while True:
        await asyncio.sleep(tick)
        used, before = time.process_time(), used
        if used - before >= QUIET_CPU_SHARE * tick:
            quiet_for, returned = 0.0, False
            continue
        quiet_for += tick
        if quiet_for >= interval and not returned:
            # In a thread: trimming a large heap takes milliseconds the loop can use.
            await asyncio.to_thread(libc.malloc_trim, 0)
            returned = True
