"""MAIL FROM / RCPT TO paths read without the email package's parser when they are simple.

aiosmtpd 1.4.6's ``SMTP._getaddr`` parses each path with the RFC 5322 parser of the email
package (``get_angle_addr``) and defines a ``typing.Protocol`` class on each call: a few
hundred microseconds per MAIL or RCPT. A path of the plain form ``<dot-atom@domain>``,
optionally followed by one space and parameters, is read with one regular expression;
anything else goes to aiosmtpd's parser, so every answer is aiosmtpd's
(tests/unit/test_smtp_addr.py compares the two).
"""

from __future__ import annotations

import re

from aiosmtpd.smtp import SMTP

# RFC 5322 3.2.3 atext; a domain label of letters, digits and inner hyphens (RFC 5321 4.1.2).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# After ">", the email parser skips whitespace and comments (CFWS): only the case of one
# space before something else, or nothing to skip at all, is read here.
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>(?: (?=[^ \t(]))?((?![ \t(]).*)",
    re.DOTALL)


class FastAddrSMTP(SMTP):
    """aiosmtpd's SMTP reading simple MAIL/RCPT paths without the email parser."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _SIMPLE_PATH.fullmatch(arg) if arg else None
        if match is None:
            return super()._getaddr(arg)  # type: ignore[no-any-return]
        addr, rest = match.group(1), match.group(2)
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest
