"""mailgrid.memory: a service reuses the heap a message freed, and returns it later.

Each case runs in a fresh interpreter, since the settings last for the whole process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc malloc settings exist on Linux only")

# A filing-like round: 60 messages of 100 KB, joined into one batch, copied, all freed.
ROUNDS = """
import json, os, resource
def one_round():
    parts = [os.urandom(1) * 102400 for _ in range(60)]
    joined = b"".join(parts)
    copied = bytes(bytearray(joined))
    del parts, joined, copied
def faults_per_round():
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
# RSS after a round with the heap kept, after `busy` seconds of work with the returner
# running, and after `quiet` seconds more.
def kept_during_and_after(interval, busy, quiet):
    import asyncio, contextlib, time
    from mailgrid.memory import keep_freed_memory, return_freed_memory
    keep_freed_memory(128 * 1024 * 1024)
    faults_per_round()
    kept = rss()
    async def spells():
        task = asyncio.create_task(return_freed_memory(interval))
        end = time.monotonic() + busy
        while time.monotonic() < end:  # a burst: the loop computes, yielding often
            sum(range(20000))
            await asyncio.sleep(0)
        during = rss()
        await asyncio.sleep(quiet)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return during
    during = asyncio.run(spells())
    return {"kept": kept, "during": during, "after": rss()}
"""


def run(code: str) -> dict[str, float]:
    script = ROUNDS + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def test_glibc_defaults_fault_a_batch_in_again_on_every_round() -> None:
    # What the settings are for: without them, each round maps its pages anew.
    assert run("print(json.dumps({'faults': faults_per_round()}))")["faults"] > 1000


def test_kept_heap_is_reused_without_page_faults() -> None:
    result = run("""
        from mailgrid.memory import keep_freed_memory
        kept = keep_freed_memory(128 * 1024 * 1024)
        print(json.dumps({'kept': kept, 'faults': faults_per_round()}))
    """)
    assert result["kept"] is True
    assert result["faults"] < 50


def test_nothing_is_kept_when_the_setting_is_zero() -> None:
    result = run("""
        from mailgrid.memory import keep_freed_memory
        kept = keep_freed_memory(0)
        print(json.dumps({'kept': kept, 'faults': faults_per_round()}))
    """)
    assert result["kept"] is False
    assert result["faults"] > 1000


def test_the_kept_heap_goes_back_to_the_os_after_the_interval() -> None:
    result = run("print(json.dumps(kept_during_and_after(0.05, busy=0, quiet=0.5)))")
    # A round holds 2 x 6 MB plus the parts: most of it was kept, then returned.
    assert result["kept"] - result["after"] > 8 * 1024 * 1024


def test_a_busy_process_keeps_its_heap_until_it_is_quiet() -> None:
    result = run("print(json.dumps(kept_during_and_after(0.1, busy=0.5, quiet=0.4)))")
    assert result["kept"] - result["during"] < 2 * 1024 * 1024
    assert result["kept"] - result["after"] > 8 * 1024 * 1024
