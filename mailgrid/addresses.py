"""Email addresses as the send path accepts them: strict, and in routable form.

Pure functions. A user-supplied address is parsed with the standard library's RFC 5322
parser (``email.headerregistry``); anything it flags as a defect is refused, as is what
we could not route: a domain that is not a host name, or a local part that needs quoting
or SMTPUTF8.
"""

from __future__ import annotations

import email.policy
import re
from email.headerregistry import Address

from mailgrid.errors import InvalidArgument

# RFC 5321 4.1.2 Domain: LDH labels; checked on the ASCII (IDNA A-label) form.
_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                     r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
# CR and LF end a header line (header injection); NUL is never allowed (RFC 5322 2.2).
_CONTROLS = re.compile(r"[\r\n\0]")
# RFC 5321 4.5.3.1: 64 octets of local part, 255 of domain.
MAX_LOCAL_PART = 64
MAX_ADDRESS = 320


def has_line_break(value: str) -> bool:
    """True when ``value`` holds CR, LF or NUL: never allowed in a header or an address."""
    return _CONTROLS.search(value) is not None


def ascii_domain(domain: str) -> str:
    """The domain in lower-case ASCII (IDNA A-labels); InvalidArgument if it is none.

    Domain literals ([192.0.2.1]) are refused: mail is routed by domain name.
    """
    name = domain.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidArgument(f"{domain!r} is not a valid domain") from None
    if not _DOMAIN.match(name):
        raise InvalidArgument(f"{domain!r} is not a valid domain name")
    return name


def parse_address(value: str) -> Address:
    """One address (display name allowed) → Address with an ASCII domain.

    InvalidArgument, saying why, for anything else: a list, a group, a defect found by
    the RFC 5322 parser, a quoted or non-ASCII local part, a bad domain.
    """
    if has_line_break(value):
        raise InvalidArgument("contains a line break or NUL")
    if len(value) > 2 * MAX_ADDRESS:
        raise InvalidArgument("is too long")
    try:
        header = email.policy.default.header_factory("to", value)
    except Exception:  # the parser raises plain IndexError/ValueError on some inputs
        raise InvalidArgument(f"{value!r} is not an email address") from None
    addresses = header.addresses  # type: ignore[attr-defined]
    if len(header.groups) != 1 or len(addresses) != 1:  # type: ignore[attr-defined]
        raise InvalidArgument(f"{value!r} must be exactly one address")
    if header.defects:
        raise InvalidArgument(f"{value!r} is not a valid email address")
    addr: Address = addresses[0]
    if not addr.username or not addr.domain:
        raise InvalidArgument(f"{value!r} is not a complete email address")
    if not addr.username.isascii():
        raise InvalidArgument(f"{value!r}: non-ASCII local parts are not supported")
    if addr.addr_spec != f"{addr.username}@{addr.domain}":
        raise InvalidArgument(f"{value!r}: quoted local parts are not supported")
    if len(addr.username) > MAX_LOCAL_PART:
        raise InvalidArgument(f"{value!r}: the local part is longer than 64 characters")
    domain = ascii_domain(addr.domain)
    return Address(display_name=addr.display_name, username=addr.username, domain=domain)
