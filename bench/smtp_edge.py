"""``python -m bench smtp-edge``: the SMTP edge's protocol layer alone under smtp-source.

An ``MxListener`` (gateway/smtp.py) whose handler accepts every recipient and whose DATA
does nothing, in a process of its own, loaded by Postfix's ``smtp-source`` with a new
connection per message: what the protocol layer (connection setup, command parsing,
the DATA reader) costs, without storage or the bus. For comparison, ``--stock`` serves
plain aiosmtpd (``SMTP``, the same handler) and ``--as-before`` MxSMTP with aiosmtpd's
own per-connection setup and line-by-line DATA (as before gateway.smtp_setup and
gateway.smtp_data; the server name is looked up once either way).

Rate = messages / wall seconds of smtp-source; CPU = the server process's user+system
seconds over the same run, per message. Other load on the machine makes both noisy:
run a few rounds and read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import psutil

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SENDER = "a@remote.test"
RCPT = "user@example.test"
# (message size, concurrent sessions) of the two loads of issue 10.
LOADS = ((4096, 20), (102400, 10))


class NullHandler:
    """Accepts everything and keeps nothing: only the protocol layer's work remains."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: queued"


async def serve(variant: str) -> None:
    """Serves until SIGTERM; prints ``PORT <n>`` once listening."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="mailgrid-smtp-edge-") as tmp:
        if variant == "stock":
            from aiosmtpd.smtp import SMTP

            handler = NullHandler()
            server = await loop.create_server(
                lambda: SMTP(handler, hostname="mx.example.test", loop=loop),
                "127.0.0.1", 0)
        else:
            server = await _mx_server(Path(tmp), as_before=variant == "as-before")
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()


async def _mx_server(tmp: Path, as_before: bool = False) -> asyncio.Server:
    from aiosmtpd.smtp import SMTP

    from gateway.smtp import MxSMTP
    from gateway.smtp_data import ChunkedDataSMTP
    from mailgrid.settings import Settings

    class StockData(ChunkedDataSMTP):
        smtp_DATA = SMTP.smtp_DATA  # what MxSMTP.smtp_DATA's super() finds below

    class AsBefore(MxSMTP, StockData):
        quick_setup = False

    cls = AsBefore if as_before else MxSMTP

    settings = Settings(data_dir=tmp, domains=["example.test"], hostname="mx.example.test",
                        smtp_addr="127.0.0.1:0", token_secret="x" * 32,
                        smtp_max_connections_per_ip=1000)
    handler = NullHandler()
    sessions: set[MxSMTP] = set()
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: cls(cast(Any, handler), settings, loop, sessions, lambda: None),
        "127.0.0.1", 0)


def run_load(port: int, size: int, sessions: int, messages: int) -> float:
    """Seconds smtp-source took; raises when it failed (any non-2xx reply aborts it)."""
    cmd = [str(SMTP_SOURCE), "-4", "-s", str(sessions), "-l", str(size), "-m", str(messages),
           "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "fatal" in done.stdout + done.stderr:
        raise RuntimeError(f"smtp-source failed: {done.stdout}{done.stderr}")
    return seconds


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def bench(variant: str, messages: int, rounds: int) -> None:
    cmd = [sys.executable, "-m", "bench.smtp_edge", "serve", variant]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server did not start: {line!r}")
        port = int(line.split()[1])
        proc = psutil.Process(server.pid)
        label = {"stock": "stock aiosmtpd", "as-before": "MxSMTP as before"}.get(variant,
                                                                               "MxSMTP")
        print(f"SMTP edge ({label}, null handler), {messages} messages per round, "
              f"{os.cpu_count()} CPUs (other load makes this noisy)")
        for size, sessions in LOADS:
            rates, cpus = [], []
            for _ in range(rounds):
                before = cpu_seconds(proc)
                seconds = run_load(port, size, sessions, messages)
                cpu = cpu_seconds(proc) - before
                rates.append(messages / seconds)
                cpus.append(cpu * 1000 / messages)
                print(f"  {size // 1024:>4} KB x{sessions:<3} {rates[-1]:8.0f} msgs/s "
                      f"{cpus[-1]:6.3f} ms CPU/msg", flush=True)
            print(f"  {size // 1024:>4} KB x{sessions:<3} median {statistics.median(rates):.0f}"
                  f" msgs/s, {statistics.median(cpus):.3f} ms CPU/msg", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench smtp-edge")
    parser.add_argument("--stock", action="store_true", help="plain aiosmtpd SMTP instead")
    parser.add_argument("--as-before", action="store_true",
                        help="MxSMTP with aiosmtpd's own setup and DATA reader")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    variant = "stock" if args.stock else "as-before" if args.as_before else "mx"
    bench(variant, args.messages, args.rounds)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve(sys.argv[2]))
    else:
        main(sys.argv[1:])
