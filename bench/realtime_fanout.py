"""What 1,000 idle live sessions cost on the bus, two ways (the realtime_svc design choice):

- ``ordered``: one JetStream ordered push consumer per session (nats-py
  ``js.subscribe(ordered_consumer=True)``, filtered to the user's subject, new events
  only): a consumer on the server, idle heartbeats, and client-side tasks per session.
- ``core``: what realtime_svc does: one core subscription per user on the republished
  ``mail.live.<user>`` subject, plus one "last sequence of this user" read at start.

Each variant runs in a process of its own against a fresh nats-server and prints one
JSON line: setup seconds, client and server RSS growth, CPU over an idle period.
``python -m bench.realtime_fanout ordered|core [N] [IDLE_SECONDS]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from bench.stats import cpu_seconds_of_tree, rss_bytes_of_tree
from mailgrid import bus
from mailgrid.natsd import NatsServer


async def _run(kind: str, sessions: int, idle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mailgrid-fanout-") as tmp:
        server = NatsServer(store_dir=Path(tmp))
        url = await server.start()
        assert server.process is not None
        server_pid = server.process.pid
        nc = await bus.connect(url, "fanout-bench")
        try:
            js = nc.jetstream()
            await bus.ensure_streams(js)
            await asyncio.sleep(0.5)
            base = (rss_bytes_of_tree(os.getpid()), rss_bytes_of_tree(server_pid))

            async def ignore(_msg: Any) -> None:
                return None

            started = time.perf_counter()
            for i in range(sessions):
                if kind == "ordered":
                    await js.subscribe(bus.events_subject(f"u{i}"), cb=ignore,
                                       ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.NEW)
                else:
                    await nc.subscribe(bus.live_subject(f"u{i}"), cb=ignore)
                    with contextlib.suppress(NotFoundError):
                        await js.get_msg("EVENTS", subject=bus.events_subject(f"u{i}"))
            await nc.flush()
            setup = time.perf_counter() - started
            await asyncio.sleep(1.0)
            cpu_client = cpu_seconds_of_tree(os.getpid())
            cpu_server = cpu_seconds_of_tree(server_pid)
            await asyncio.sleep(idle)
            return {
                "kind": kind, "sessions": sessions, "setup_s": setup,
                "client_rss_per_session": (rss_bytes_of_tree(os.getpid()) - base[0]) / sessions,
                "server_rss_per_session": (rss_bytes_of_tree(server_pid) - base[1]) / sessions,
                "client_cpu_pct": 100 * (cpu_seconds_of_tree(os.getpid()) - cpu_client) / idle,
                "server_cpu_pct": 100 * (cpu_seconds_of_tree(server_pid) - cpu_server) / idle,
            }
        finally:
            await nc.close()
            server.stop()


def measure(kind: str, sessions: int = 1000, idle: float = 10.0) -> dict[str, Any]:
    """Runs one variant in a fresh interpreter (so RSS growth is its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.realtime_fanout", kind, str(sessions), str(idle)],
        capture_output=True, text=True, check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def row(r: dict[str, Any]) -> str:
    return (f"{r['kind']:<8} {r['sessions']} sessions: setup {r['setup_s']:5.2f} s, "
            f"RSS/session client {r['client_rss_per_session'] / 1024:6.1f} KiB "
            f"server {r['server_rss_per_session'] / 1024:6.1f} KiB, idle CPU client "
            f"{r['client_cpu_pct']:5.1f} % server {r['server_cpu_pct']:5.1f} %")


if __name__ == "__main__":
    kind = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    idle_for = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    print(json.dumps(asyncio.run(_run(kind, count, idle_for))))
