"""`mailgrid reindex [--user ADDRESS]`: rebuild the search index from the mailbox store.

Asks the running suite's search_svc to rebuild (it owns the index; the embedded one is
a directory only it may write) and draws its progress on stderr: a bar redrawn in place
on a terminal, a line per user otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from mailgrid.errors import Unavailable
from mailgrid.launcher import pid_alive, read_endpoints
from mailgrid.search_client import SearchClient
from mailgrid.settings import Settings
from mailgrid.v1 import search_pb2

BAR_WIDTH = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", metavar="ADDRESS",
                        help="rebuild only this user's mail (default: every user)")


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    running = read_endpoints(settings.data_dir)
    if running is None or "search" not in running.services \
            or not pid_alive(running.launcher_pid):
        raise Unavailable(f"no suite is running on {settings.data_dir} (start `mailgrid up`)")
    done = asyncio.run(reindex(running.services["search"].grpc_addr, args.user or "",
                               sys.stderr))
    print(f"reindexed {_count(done.messages_done, 'message')} of "
          f"{_count(done.users_done, 'user')}")
    return 0


async def reindex(addr: str, address: str, out: TextIO) -> search_pb2.ReindexResponse:
    """Runs the rebuild, drawing progress on ``out``; returns the final progress."""
    last = search_pb2.ReindexResponse()
    live = out.isatty()
    users_seen = 0
    async with SearchClient(addr) as client:
        async for progress in client.reindex(search_pb2.ReindexRequest(address=address)):
            last = progress
            if live:
                out.write("\r" + progress_line(progress))
            elif progress.users_done != users_seen:
                users_seen = progress.users_done
                out.write(progress_line(progress) + "\n")
            out.flush()
    if live:
        out.write("\n")
    return last


def progress_line(p: search_pb2.ReindexResponse) -> str:
    """``[#########.....]  1200/4000 messages  1/3 users  alice@example.test``."""
    total = max(p.messages_total, p.messages_done)
    filled = BAR_WIDTH if not total else BAR_WIDTH * p.messages_done // total
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return (f"[{bar}] {p.messages_done:>7}/{total} messages  "
            f"{p.users_done}/{p.users_total} users  {p.current_user}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
