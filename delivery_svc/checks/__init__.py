"""Inbound checks: what decides the folder of a message from outside, and why.

Once per inbound job (``InboundChecks.evaluate``): SPF/DKIM/DMARC (checks.auth) for mail
that came through our MX, and a virus scan (checks.virus). Then per recipient
(``InboundChecks.decide``): the spam score (checks.spam) with that user's sender lists,
and the folder. The outcome is an InboundVerdict stored with the message (and shown by
the API): the raw message stays byte-identical to what was received, so the RFC 8601
Authentication-Results header is kept as metadata rather than written into the blob.

Folder rules, strongest first:
- a virus → Spam, and the recipient gets a notice in the inbox (the inbound worker);
- DMARC fail under a p=reject or p=quarantine policy → Spam (not refused at SMTP time:
  see docs in README "Inbound checks"), whatever the user's allow list says: the allow
  list trusts a From address, which is exactly what DMARC found forged;
- spam score at or above the threshold (block list entries add 100) → Spam;
- otherwise the inbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from delivery_svc.checks import spam
from delivery_svc.checks.auth import AuthChecker, AuthResults, header_names
from delivery_svc.checks.virus import VirusScanner, make_scanner
from delivery_svc.routing import make_sync_resolver
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2, metadata_pb2

log = logging.getLogger(__name__)


@dataclass
class JobChecks:
    """What the checks found for one inbound job (all its recipients)."""

    auth: AuthResults | None
    authentication_results: str
    header_names: set[bytes]
    mail_from: str
    # Came in through our MX (rather than from a local user's submission).
    external: bool
    virus: str = ""
    # The spam rules of the message itself, the same for every recipient: worked out
    # for the first recipient's copy and reused for the others.
    spam_rules: tuple[spam.Rule, ...] | None = None


class InboundChecks:
    def __init__(self, settings: Settings, scanner: VirusScanner | None = None) -> None:
        self.settings = settings
        self.scanner = scanner or make_scanner(settings.clamd_address)
        self._auth: AuthChecker | None = None

    @property
    def auth_checker(self) -> AuthChecker:
        # Built on first use: loading the Public Suffix List takes a moment.
        if self._auth is None:
            self._auth = AuthChecker(make_sync_resolver(self.settings.outbound_nameserver))
        return self._auth

    async def evaluate(self, job: delivery_pb2.InboundJob, raw: bytes) -> JobChecks:
        server = self.settings.server_name
        names = set(header_names(raw))
        if not job.client_address:
            # Submitted by one of our authenticated users (delivery_svc.submit).
            value = (f"{server}; auth=pass (submitted by a local user)"
                     f" smtp.mailfrom={job.mail_from or '<>'}")
            checks = JobChecks(None, value, names, job.mail_from, external=False)
        elif not self.settings.inbound_auth_checks:
            checks = JobChecks(None, f"{server}; none", names, job.mail_from, external=True)
        else:
            try:
                auth = await asyncio.to_thread(self.auth_checker.check, raw,
                                               _client_ip(job.client_address),
                                               job.mail_from, job.helo)
            except Exception:  # a bug in a check must not keep mail from its recipients
                log.exception("job %s: authentication checks failed", job.queue_id)
                checks = JobChecks(None, f"{server}; none (checks failed)", names,
                                   job.mail_from, external=True)
            else:
                checks = JobChecks(auth, auth.header_value(server), names, job.mail_from,
                                   external=True)
        checks.virus = await self.scanner.scan(raw)
        # What the checks found is worth a line; that none ran (checks off, or mail from
        # a local user) is not, except when debugging.
        log.log(logging.INFO if checks.auth is not None or checks.virus else logging.DEBUG,
                "job %s: %s%s", job.queue_id,
                checks.authentication_results.replace("\r\n\t", " "),
                f"; virus {checks.virus}" if checks.virus else "")
        return checks

    def decide(self, checks: JobChecks, parsed: metadata_pb2.ParsedMessage,
               lists: Iterable[common_pb2.SenderListEntry]
               ) -> tuple[str, common_pb2.InboundVerdict]:
        """(folder role, verdict) for one recipient's copy."""
        verdict = common_pb2.InboundVerdict(
            authentication_results=checks.authentication_results, virus=checks.virus)
        if checks.virus:
            verdict.reason = f"virus {checks.virus} found: quarantined"
            return "spam", verdict
        if not checks.external:
            return "inbox", verdict
        org = (self.auth_checker.organizational_domain if checks.auth is not None
               else _plain_domain)
        if checks.spam_rules is None:
            checks.spam_rules = spam.message_rules(parsed, checks.header_names, checks.auth,
                                                   checks.mail_from, self.settings.domains,
                                                   org)
        report = spam.score(checks.spam_rules, getattr(parsed, "from").email, lists,
                            self.settings.spam_threshold)
        verdict.spam.CopyFrom(report)
        auth = checks.auth
        if auth is not None and auth.dmarc == "fail" and auth.dmarc_policy in (
                "reject", "quarantine"):
            verdict.reason = (f"DMARC policy p={auth.dmarc_policy} of {auth.from_domain}: "
                              f"{auth.dmarc_detail}")
            return "spam", verdict
        if report.score >= report.threshold:
            top = max(report.rules, key=lambda r: r.score)
            verdict.reason = (f"spam score {report.score:g} >= {report.threshold:g} "
                              f"(mostly {top.name}: {top.detail})")
            return "spam", verdict
        return "inbox", verdict


def _client_ip(address: str) -> str:
    """'1.2.3.4:5678' or '[::1]:25' or a bare address → the IP."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        return address.partition(":")[0]
    return address


def _plain_domain(domain: str) -> str:
    return domain.lower()
