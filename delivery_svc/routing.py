"""Where mail for a domain goes: static routes, then MX records, then the domain's address.

RFC 5321 5.1: the MX records of the domain, most preferred (lowest) first, equal
preferences in random order; no MX records means the domain itself is the mail
exchanger (its A/AAAA records). RFC 7505: a single MX of "." (the null MX) says the
domain accepts no mail at all, a permanent failure.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mailgrid.errors import InvalidArgument
from mailgrid.settings import Settings, split_host_port

log = logging.getLogger(__name__)

R = TypeVar("R", bound=dns.resolver.BaseResolver)

# Seconds one DNS lookup may take in all (each server try is shorter).
DNS_LIFETIME = 10.0


@dataclass(frozen=True)
class Target:
    """One address to connect to, and the name it was found under (for TLS and DSNs)."""

    name: str
    address: str
    port: int


class RouteError(Exception):
    """No place to deliver to: permanent (the domain takes no mail) or temporary (DNS)."""

    def __init__(self, permanent: bool, status: str, reason: str) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.status = status
        self.reason = reason


def parse_routes(text: str) -> dict[str, tuple[str, int]]:
    """'example.org=127.0.0.1:2525,*=relay:25' → {domain: (host, port)}."""
    routes: dict[str, tuple[str, int]] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        domain, sep, addr = item.partition("=")
        if not sep or not domain.strip():
            raise InvalidArgument(f"outbound route {item!r}: expected DOMAIN=HOST:PORT")
        try:
            routes[domain.strip().lower().rstrip(".")] = split_host_port(addr.strip())
        except ValueError as err:
            raise InvalidArgument(f"outbound route {item!r}: {err}") from None
    return routes


def make_resolver(nameserver: str) -> dns.asyncresolver.Resolver:
    """The system's resolver, or one asking only ``nameserver`` (HOST:PORT)."""
    return _configure(dns.asyncresolver.Resolver(configure=not nameserver), nameserver)


def make_sync_resolver(nameserver: str) -> dns.resolver.Resolver:
    """The blocking twin of make_resolver, for libraries that look up synchronously
    (pyspf, dkimpy: the inbound checks run them in a thread)."""
    return _configure(dns.resolver.Resolver(configure=not nameserver), nameserver)


def _configure(resolver: R, nameserver: str) -> R:
    if nameserver:
        host, port = split_host_port(nameserver)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.lifetime = DNS_LIFETIME
    return resolver


class Router:
    """Finds the targets of a domain, in the order they are to be tried."""

    def __init__(self, settings: Settings) -> None:
        self.routes = parse_routes(settings.outbound_routes)
        self.port = settings.outbound_port
        self.resolver = make_resolver(settings.outbound_nameserver)

    async def targets(self, domain: str) -> list[Target]:
        domain = domain.lower().rstrip(".")
        route = self.routes.get(domain) or self.routes.get("*")
        if route is not None:
            host, port = route
            return [Target(host, host, port)]
        exchangers = await self.exchangers(domain)
        targets: list[Target] = []
        for name in exchangers:
            for address in await self.addresses(name, implicit=False):
                targets.append(Target(name, address, self.port))
        if not targets:
            raise RouteError(False, "4.4.4",
                             f"no address found for the mail exchangers of {domain}")
        return targets

    async def exchangers(self, domain: str) -> list[str]:
        """MX host names by preference; the domain itself when it has no MX records."""
        answer = await self._query(domain, "MX")
        if answer is None:  # RFC 5321 5.1: the implicit MX
            if not await self.addresses(domain, implicit=True):
                raise RouteError(True, "5.1.2", f"{domain} has no MX and no address records")
            return [domain]
        records = list(answer)
        if any(r.exchange == dns.name.root for r in records):  # type: ignore[attr-defined]
            raise RouteError(True, "5.1.10",
                             f"{domain} accepts no mail (null MX, RFC 7505)")
        random.shuffle(records)  # equal preferences in random order ...
        records.sort(key=lambda r: r.preference)  # type: ignore[attr-defined]
        names = [r.exchange.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
                 for r in records]
        return list(dict.fromkeys(names))

    async def addresses(self, name: str, implicit: bool) -> list[str]:
        """IPv4 then IPv6 addresses of ``name``."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(name, rdtype)
            except RouteError as err:
                if err.permanent and not implicit:
                    continue  # an MX host that does not exist: try the next one
                raise
            if answer is not None:
                found.extend(r.address for r in answer)  # type: ignore[attr-defined]
        return found

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None when the name exists without such records; RouteError."""
        try:
            return await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise RouteError(True, "5.1.2", f"domain {name} does not exist (NXDOMAIN)"
                             ) from None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as err:
            raise RouteError(False, "4.4.3", f"DNS lookup of {name} {rdtype} failed: {err}"
                             ) from None
        except dns.exception.DNSException as err:
            raise RouteError(False, "4.4.3", f"DNS lookup of {name} {rdtype} failed: {err}"
                             ) from None
