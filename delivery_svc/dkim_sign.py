"""DKIM signing (RFC 6376) of outgoing mail, for domains that have a key.

Keys are PEM RSA private keys (PKCS#1) in ``data_dir/dkim``: ``<domain>.key`` signed with
the ``dkim_selector`` setting, or ``<selector>._domainkey.<domain>.key`` naming its own
selector. The public half is published by the domain's owner as a TXT record at
``<selector>._domainkey.<domain>``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path

import dkim

from delivery_svc.dsn import header_block

log = logging.getLogger(__name__)

# RFC 6376 5.4.1: what a signature should cover. From is required; the rest binds the
# visible message (and its MIME structure) to the signature.
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding")


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    pem: bytes


class DkimSigner:
    """Finds the key for a message's From domain and signs the message with it."""

    def __init__(self, key_dir: Path, default_selector: str) -> None:
        self.key_dir = key_dir
        self.default_selector = default_selector

    def find_key(self, domain: str) -> SigningKey | None:
        domain = domain.lower().rstrip(".")
        if not domain or "/" in domain or domain.startswith("."):
            return None
        plain = self.key_dir / f"{domain}.key"
        if plain.is_file():
            return SigningKey(domain, self.default_selector, plain.read_bytes())
        for path in sorted(self.key_dir.glob(f"*._domainkey.{domain}.key")):
            selector = path.name.removesuffix(f"._domainkey.{domain}.key")
            return SigningKey(domain, selector, path.read_bytes())
        return None

    def sign(self, message: bytes, fallback_domain: str = "") -> bytes:
        """``message`` with a DKIM-Signature header on top, or unchanged without a key."""
        domain = from_domain(message) or fallback_domain
        key = self.find_key(domain) if self.key_dir.is_dir() else None
        if key is None:
            return message
        present = {line.partition(b":")[0].strip().lower()
                   for line in header_block(message).split(b"\r\n")
                   if line and not line[:1].isspace()}
        headers = [h for h in SIGNED_HEADERS if h in present]
        signature = dkim.sign(message, key.selector.encode(), key.domain.encode(), key.pem,
                              canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=headers, linesep=b"\r\n")
        return bytes(signature) + message

    async def sign_async(self, message: bytes, fallback_domain: str = "") -> bytes:
        # RSA signing and the key file read are blocking work: off the event loop.
        return await asyncio.to_thread(self.sign, message, fallback_domain)


def from_domain(message: bytes) -> str:
    """The domain of the (first) From address in the header, lower case; '' if none."""
    value: list[bytes] = []
    collecting = False
    for line in header_block(message).split(b"\r\n"):
        if collecting and line[:1] in (b" ", b"\t"):
            value.append(line)
            continue
        if collecting:
            break
        name, _, rest = line.partition(b":")
        if name.strip().lower() == b"from":
            value, collecting = [rest], True
    if not value:
        return ""
    _, address = parseaddr(b" ".join(value).decode("utf-8", "replace"))
    return address.rpartition("@")[2].lower()
