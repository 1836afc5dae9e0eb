"""``python -m bench [ingest] [listing] [realtime] [--quick]``: run a private suite, measure.

``python -m bench postfix [--messages N] [--rounds N] [--no-listing] [--json PATH]``:
mailgrid and a private Postfix side by side under smtp-source (bench/vs_postfix.py).

``python -m bench smtp-edge [--stock|--as-before] [--messages N] [--rounds N]``: the SMTP
protocol layer alone (MxSMTP, a handler that does nothing) under smtp-source
(bench/smtp_edge.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from bench.ingest import run_ingest
from bench.suite import Suite

PASSWORD = "bench-password-1"


def ingest(quick: bool) -> None:
    plan = [(4 * 1024, c, 60 if quick else 1000) for c in (1, 10, 50)]
    plan += [(100 * 1024, c, 30 if quick else 300) for c in (1, 10, 50)]
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-") as tmp, \
            Suite(Path(tmp) / "data") as suite:
        rcpt = "bench@example.test"
        suite.mailgrid("user", "add", rcpt, "--password", PASSWORD)
        print("SMTP ingest (new suite, one recipient; rate = until visible over HTTP)")
        for size, concurrency, count in plan:
            result = asyncio.run(run_ingest(suite.smtp_addr, f"http://{suite.http_addr}",
                                            rcpt, PASSWORD, size, concurrency, count))
            print("  " + result.row(), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["postfix"]:
        # Its own options (bench/vs_postfix.py); not combinable with the others.
        from bench.vs_postfix import main as vs_postfix

        vs_postfix(sys.argv[2:])
        return
    if sys.argv[1:2] == ["smtp-edge"]:
        from bench.smtp_edge import main as smtp_edge

        smtp_edge(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("which", nargs="*", default=["ingest", "listing"])
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    args = parser.parse_args()
    if "ingest" in args.which:
        ingest(args.quick)
    if "send" in args.which:
        from bench.send import send

        send(args.quick)
    if "realtime" in args.which:
        from bench.realtime import realtime

        realtime(args.quick)
    if "outbound" in args.which:
        from bench.outbound import outbound

        outbound(args.quick)
    if "listing" in args.which:
        from bench.listing import listing

        listing(args.quick)
    if "search" in args.which:
        from bench.search import search

        search(args.quick)
    if "search-meilisearch" in args.which:
        from bench.search import search

        search(args.quick, backend="meilisearch")


if __name__ == "__main__":
    main()
