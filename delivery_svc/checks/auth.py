"""Sender authentication of inbound mail: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489).

Every lookup goes through one configured resolver (the ``outbound_nameserver`` setting,
shared with MX routing). pyspf and dkimpy are blocking libraries: ``AuthChecker.check``
runs in a thread. The result renders as an RFC 8601 Authentication-Results value.

DMARC is evaluated here rather than through authheaders: authheaders does its own DNS
(not through our resolver) and the evaluation is small (RFC 7489 6.6): find the policy
record at ``_dmarc.<From domain>`` or, failing that, at the organizational domain (Public
Suffix List), then pass when an SPF or DKIM pass is aligned with the From domain.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from delivery_svc.dsn import header_block

log = logging.getLogger(__name__)

# RFC 7208 4.6.4: at most two void lookups; pyspf's own limit constant.
MAX_VOID_LOOKUPS = spf.MAX_VOID_LOOKUPS


class DnsTempError(Exception):
    """The resolver could not get an answer (timeout, SERVFAIL)."""


class Dns:
    """TXT/A/AAAA/MX/PTR lookups through one resolver; '' answers for names without data."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    def answer(self, name: str, rdtype: str) -> list[Any]:
        try:
            return list(self.resolver.resolve(name, rdtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as err:
            raise DnsTempError(f"DNS lookup of {name} {rdtype} failed: {err}") from None

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined (RFC 7208 3.3)."""
        return [b"".join(r.strings) for r in self.answer(name, "TXT")]


class _SpfQuery(spf.query):  # type: ignore[misc]
    """pyspf's evaluation with its DNS lookups sent to our resolver (pyspf otherwise
    uses dnspython's process-wide default resolver)."""

    def __init__(self, lookups: Dns, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lookups = lookups

    def dns(self, name: str, qtype: str, cnames: Any = None,
            ignore_void: bool = False) -> list[Any]:
        name = str(name).rstrip(".").lower()
        if not name or any(not 0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self.cache:
            try:
                records = self._lookups.answer(name, qtype)
            except DnsTempError as err:
                raise spf.TempError(str(err)) from None
            self.cache[key] = [_spf_value(qtype, r) for r in records]
        result: list[Any] = self.cache[key]
        if not result and not ignore_void:  # RFC 7208 4.6.4
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {MAX_VOID_LOOKUPS} exceeded")
        return result


def _spf_value(qtype: str, record: Any) -> Any:
    """A record in the shape pyspf's own DNSLookup returns."""
    if qtype in ("A", "AAAA"):
        return record.address
    if qtype == "MX":
        return (record.preference, record.exchange)
    if qtype == "PTR":
        return record.target.to_text(True)
    return record.strings  # TXT, SPF


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass, fail, neutral, permerror, temperror
    domain: str
    selector: str
    detail: str = ""


@dataclass
class AuthResults:
    """What SPF, DKIM and DMARC said about one message."""

    spf: str = "none"
    spf_domain: str = ""
    spf_detail: str = ""
    mail_from: str = ""
    helo: str = ""
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: str = "none"
    # The policy that applies to a failure: none, quarantine, reject ('' without a record).
    dmarc_policy: str = ""
    dmarc_detail: str = ""
    from_domain: str = ""

    @property
    def dkim_pass_domains(self) -> list[str]:
        return [d.domain for d in self.dkim if d.result == "pass"]

    def header_value(self, server_name: str) -> str:
        """The RFC 8601 Authentication-Results value (authserv-id = our host)."""
        parts = [server_name]
        spf_prop = (f"smtp.mailfrom={self.mail_from}" if self.mail_from
                    else f"smtp.helo={self.helo or 'unknown'}")
        parts.append(f"spf={self.spf}{_comment(self.spf_detail)} {spf_prop}")
        if not self.dkim:
            parts.append("dkim=none")
        for sig in self.dkim:
            props = " ".join(p for p in (f"header.d={sig.domain}" if sig.domain else "",
                                         f"header.s={sig.selector}" if sig.selector else "")
                             if p)
            parts.append(f"dkim={sig.result}{_comment(sig.detail)}"
                         + (f" {props}" if props else ""))
        policy = f"p={self.dmarc_policy}" if self.dmarc_policy else ""
        dmarc_from = f" header.from={self.from_domain}" if self.from_domain else ""
        parts.append(f"dmarc={self.dmarc}{_comment(policy)}{dmarc_from}")
        return ";\r\n\t".join(parts)


def _comment(text: str) -> str:
    # RFC 5322 comments: parentheses and backslashes inside must not end it early.
    text = " ".join(re.sub(r"[()\\]", " ", text).split())
    return f" ({text})" if text else ""


@dataclass(frozen=True)
class DmarcRecord:
    policy: str
    subdomain_policy: str
    adkim: str
    aspf: str
    domain: str


class AuthChecker:
    """Runs the three checks for a message (blocking: call it in a thread)."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.dns = Dns(resolver)
        self.psl = PublicSuffixList()

    def check(self, raw: bytes, client_ip: str, mail_from: str, helo: str) -> AuthResults:
        res = AuthResults(mail_from=mail_from, helo=helo)
        res.spf, res.spf_domain, res.spf_detail = self.check_spf(client_ip, mail_from, helo)
        res.dkim = self.check_dkim(raw)
        self.check_dmarc(raw, res)
        return res

    # SPF

    def check_spf(self, client_ip: str, mail_from: str, helo: str) -> tuple[str, str, str]:
        """(result, checked domain, explanation). RFC 7208 2.4: the null sender is
        checked as postmaster@HELO."""
        sender = mail_from or f"postmaster@{helo}"
        domain = sender.rpartition("@")[2].lower()
        if not client_ip or not domain:
            return "none", domain, "no client address or sender domain"
        try:
            query = _SpfQuery(self.dns, i=client_ip, s=sender, h=helo or domain,
                              querytime=20)
            result, _code, explanation = query.check()
        except Exception as err:  # pyspf raises for odd input: never fail the job on it
            log.warning("SPF check of %s from %s failed: %s", sender, client_ip, err)
            return "permerror", domain, str(err)
        return str(result), domain, str(explanation)

    # DKIM

    def check_dkim(self, raw: bytes) -> list[DkimResult]:
        count = sum(1 for name in header_names(raw) if name == b"dkim-signature")
        return [self._verify_one(raw, idx) for idx in range(min(count, 5))]

    def _verify_one(self, raw: bytes, idx: int) -> DkimResult:
        try:
            verifier = dkim.DKIM(raw, logger=log)
        except Exception as err:  # dkimpy refuses some header sections outright
            return DkimResult("permerror", "", "", f"unparsable message: {err}"[:200])
        try:
            ok = verifier.verify(idx=idx, dnsfunc=self._dkim_txt)
        except DnsTempError as err:
            return _dkim_result(verifier, "temperror", str(err))
        except dkim.DKIMException as err:
            # RFC 8601 2.7.1: a body that no longer matches its hash is a failed
            # verification ("fail"); a signature that cannot be checked is "permerror".
            if str(err).startswith("body hash mismatch"):
                return _dkim_result(verifier, "fail", "body hash mismatch")
            return _dkim_result(verifier, "permerror", str(err)[:200])
        except Exception as err:  # malformed input deep in the library: not our crash
            return _dkim_result(verifier, "permerror", f"unverifiable: {err}"[:200])
        return _dkim_result(verifier, "pass" if ok else "fail",
                            "" if ok else "signature did not verify")

    def _dkim_txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        records = self.dns.txt(name.decode("ascii", "replace"))
        return records[0] if records else None

    # DMARC

    def organizational_domain(self, domain: str) -> str:
        return self.psl.privatesuffix(domain) or domain

    def check_dmarc(self, raw: bytes, res: AuthResults) -> None:
        senders = from_domains(raw)
        if len(set(senders)) != 1:
            # RFC 7489 6.6.1: no single author domain to evaluate.
            res.dmarc = "none" if not senders else "permerror"
            res.dmarc_detail = ("no From domain" if not senders
                                else "several From domains")
            return
        res.from_domain = senders[0]
        try:
            record = self.dmarc_record(res.from_domain)
        except DnsTempError as err:
            res.dmarc, res.dmarc_detail = "temperror", str(err)
            return
        if record is None:
            res.dmarc, res.dmarc_detail = "none", "no DMARC record"
            return
        sub = record.domain != res.from_domain
        res.dmarc_policy = record.subdomain_policy if sub else record.policy
        spf_ok = res.spf == "pass" and self._aligned(res.spf_domain, res.from_domain,
                                                     record.aspf)
        dkim_ok = any(self._aligned(d, res.from_domain, record.adkim)
                      for d in res.dkim_pass_domains)
        res.dmarc = "pass" if spf_ok or dkim_ok else "fail"
        res.dmarc_detail = ("aligned " + " and ".join(
            n for n, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)) if (
            spf_ok or dkim_ok) else "neither SPF nor DKIM passed aligned with From"

    def dmarc_record(self, domain: str) -> DmarcRecord | None:
        """The record at _dmarc.<domain>, else at the organizational domain (RFC 7489
        6.6.3)."""
        org = self.organizational_domain(domain)
        for candidate in dict.fromkeys((domain, org)):
            found = [r for r in self.dns.txt(f"_dmarc.{candidate}")
                     if r.strip().lower().startswith(b"v=dmarc1")]
            if len(found) == 1:
                record = parse_dmarc(found[0].decode("ascii", "replace"), candidate)
                if record is not None:
                    return record
        return None

    def _aligned(self, domain: str, from_domain: str, mode: str) -> bool:
        domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
        if not domain:
            return False
        if mode == "s":
            return domain == from_domain
        return self.organizational_domain(domain) == self.organizational_domain(from_domain)


def parse_dmarc(text: str, domain: str) -> DmarcRecord | None:
    """The tags of a DMARC record (RFC 7489 6.3); None if p= is missing or invalid."""
    tags: dict[str, str] = {}
    for item in text.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            tags[name.strip().lower()] = value.strip().lower()
    policy = tags.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        return None
    sub = tags.get("sp", policy)
    return DmarcRecord(
        policy=policy, subdomain_policy=sub if sub in ("none", "quarantine", "reject")
        else policy, adkim="s" if tags.get("adkim") == "s" else "r",
        aspf="s" if tags.get("aspf") == "s" else "r", domain=domain)


def header_names(raw: bytes) -> list[bytes]:
    return [line.partition(b":")[0].strip().lower()
            for line in header_block(raw).split(b"\r\n")
            if line and not line[:1].isspace()]


def from_domains(raw: bytes) -> list[str]:
    """The domains of the From header field(s), lower case (RFC 7489 6.6.1)."""
    values: list[str] = []
    current: list[bytes] | None = None
    for line in header_block(raw).split(b"\r\n"):
        if current is not None and line[:1] in (b" ", b"\t"):
            current.append(line)
            continue
        if current is not None:
            values.append(b" ".join(current).decode("utf-8", "replace"))
            current = None
        name, _, rest = line.partition(b":")
        if name.strip().lower() == b"from":
            current = [rest]
    if current is not None:
        values.append(b" ".join(current).decode("utf-8", "replace"))
    return [addr.rpartition("@")[2].lower().rstrip(".")
            for _, addr in getaddresses(values) if "@" in addr]


def _dkim_result(verifier: dkim.DKIM, result: str, detail: str) -> DkimResult:
    domain = _text(verifier.domain)
    # Before a signature is parsed dkimpy's selector is a placeholder: not a finding.
    return DkimResult(result, domain, _text(verifier.selector) if domain else "", detail)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return "" if value is None else str(value)
