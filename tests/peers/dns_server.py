"""A real DNS server for tests: answers from a zone file, over UDP and TCP, on loopback.

    python -m tests.peers.dns_server --zone FILE [--host 127.0.0.1] [--port 0]

Prints ``listening on HOST:PORT`` once both sockets are bound. Authoritative for what
the zone holds: a name with records but none of the asked type gets NOERROR with no
answer (so a domain without MX falls back to its A record, RFC 5321 5.1); a name it does
not hold gets NXDOMAIN. Long TXT records (DKIM keys) are written as several strings.
Replies too large for UDP are truncated and the client retries over TCP, as in life.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: str) -> None:
        self.records = RR.fromZone(zone)
        self.names = {str(rr.rname).lower() for rr in self.records}

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).lower()
        qtype = request.q.qtype
        if qname not in self.names:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rr in self.records:
            if str(rr.rname).lower() == qname and (qtype in (rr.rtype, QTYPE.ANY)):
                reply.add_answer(rr)
        return reply


def serve(zone: str, host: str, port: int) -> tuple[DNSServer, DNSServer]:
    resolver = ZoneResolver(zone)
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    for _ in range(20):
        udp = DNSServer(resolver, address=host, port=port, logger=quiet)
        bound = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address=host, port=bound, tcp=True, logger=quiet)
        except OSError:
            udp.server.server_close()
            if port:
                raise
            continue
        return udp, tcp
    raise OSError("no port free for both UDP and TCP")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.dns_server")
    parser.add_argument("--zone", type=Path, required=True, help="zone file (dig format)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    udp, tcp = serve(args.zone.read_text(), args.host, args.port)
    for server in (udp, tcp):
        threading.Thread(target=server.start, daemon=True).start()
    print(f"listening on {args.host}:{udp.server.server_address[1]}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
