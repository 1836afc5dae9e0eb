"""`mailgrid dkim generate DOMAIN` and `mailgrid domain check DOMAIN`.

``dkim generate`` writes an RSA key where the outbound signer looks for it
(delivery_svc/dkim_sign.py: ``data_dir/dkim/<domain>.key`` for the ``dkim_selector``
setting, ``<selector>._domainkey.<domain>.key`` for another selector) and prints the TXT
record to publish (RFC 6376 3.6.1). ``domain check`` asks DNS (the outbound_nameserver
setting, as delivery does) for the domain's SPF, DKIM and DMARC records and says what is
missing or does not match our key; it exits 1 when something is.
"""

from __future__ import annotations

import argparse
import base64
import os
from dataclasses import dataclass
from pathlib import Path

from mailgrid.errors import AlreadyExists, InvalidArgument
from mailgrid.settings import Settings

# RFC 8301: at least 1024 bits; 2048 is what providers publish today.
DEFAULT_BITS = 2048
# One character-string of a TXT record holds at most 255 bytes (RFC 1035 3.3).
TXT_CHUNK = 250


def add_dkim_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="dkim_command", required=True, metavar="ACTION")
    gen = actions.add_parser("generate", help="create a signing key for a domain and print "
                                              "its DNS TXT record")
    gen.add_argument("domain", metavar="DOMAIN")
    gen.add_argument("--selector", help="DKIM selector (default: the dkim_selector setting)")
    gen.add_argument("--bits", type=int, default=DEFAULT_BITS, choices=(1024, 2048, 3072,
                                                                         4096))
    gen.add_argument("--force", action="store_true", help="replace an existing key")


def add_domain_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="report the SPF, DKIM and DMARC records the "
                                             "domain publishes and what is missing")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--selector", help="DKIM selector to look up (default: the one of "
                                          "our key for the domain, else dkim_selector)")


def _domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    labels = domain.split(".")
    if (len(labels) < 2 or any(not label or len(label) > 63 for label in labels)
            or not all(c.isalnum() or c in "-." for c in domain)):
        raise InvalidArgument(f"not a domain name: {text!r}")
    return domain


def key_path(settings: Settings, domain: str, selector: str) -> Path:
    if selector == settings.dkim_selector:
        return settings.dkim_dir / f"{domain}.key"
    return settings.dkim_dir / f"{selector}._domainkey.{domain}.key"


def txt_record(selector: str, domain: str, public_der: bytes) -> str:
    """The zone-file line to publish, long values split into character-strings."""
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode()}"
    strings = " ".join(f'"{value[i:i + TXT_CHUNK]}"' for i in range(0, len(value), TXT_CHUNK))
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"


def cmd_dkim(args: argparse.Namespace, settings: Settings) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    domain = _domain(args.domain)
    selector = (args.selector or settings.dkim_selector).strip().lower()
    if not selector or not all(c.isalnum() or c in "-." for c in selector):
        raise InvalidArgument(f"not a DKIM selector: {args.selector!r}")
    path = key_path(settings, domain, selector)
    if path.exists() and not args.force:
        raise AlreadyExists(f"{path} exists (use --force to replace it)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    # The private key: readable by its owner only, written in one step.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    tmp.replace(path)
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    print(f"wrote {path} ({args.bits}-bit RSA, selector {selector})")
    print("publish this DNS record:")
    print(txt_record(selector, domain, public))
    return 0


@dataclass
class Finding:
    name: str
    ok: bool
    text: str


def cmd_domain(args: argparse.Namespace, settings: Settings) -> int:
    findings = check_domain(settings, _domain(args.domain), args.selector or "")
    for f in findings:
        print(f"{f.name:<6} {'ok' if f.ok else 'MISSING':<8} {f.text}")
    missing = [f.name for f in findings if not f.ok]
    print(f"missing or wrong: {', '.join(missing)}" if missing
          else "SPF, DKIM and DMARC are all published")
    return 1 if missing else 0


def check_domain(settings: Settings, domain: str, selector: str = "") -> list[Finding]:
    from delivery_svc.checks.auth import Dns, DnsTempError, parse_dmarc
    from delivery_svc.dkim_sign import DkimSigner
    from delivery_svc.routing import make_sync_resolver

    lookups = Dns(make_sync_resolver(settings.outbound_nameserver))
    ours = DkimSigner(settings.dkim_dir, settings.dkim_selector).find_key(domain) \
        if settings.dkim_dir.is_dir() else None
    selector = selector or (ours.selector if ours else settings.dkim_selector)
    try:
        spf = [r.decode("ascii", "replace") for r in lookups.txt(domain)
               if r.lower().startswith(b"v=spf1")]
        dkim = [r.decode("ascii", "replace") for r in
                lookups.txt(f"{selector}._domainkey.{domain}")]
        dmarc = [r.decode("ascii", "replace") for r in lookups.txt(f"_dmarc.{domain}")
                 if r.lower().startswith(b"v=dmarc1")]
    except DnsTempError as err:
        raise InvalidArgument(f"cannot check {domain}: {err}") from None
    found = [_spf_finding(domain, spf),
             _dkim_finding(domain, selector, dkim, ours.pem if ours else None)]
    if len(dmarc) == 1 and parse_dmarc(dmarc[0], domain) is not None:
        found.append(Finding("DMARC", True, f"_dmarc.{domain}: {dmarc[0]}"))
    else:
        found.append(Finding("DMARC", False, f"_dmarc.{domain}: " + (
            "no v=DMARC1 record; publish e.g. \"v=DMARC1; p=quarantine\"" if not dmarc
            else f"{len(dmarc)} records or no valid p= tag (RFC 7489 6.6.3)")))
    return found


def _spf_finding(domain: str, spf: list[str]) -> Finding:
    if len(spf) == 1:
        return Finding("SPF", True, f"{domain}: {spf[0]}")
    if not spf:
        return Finding("SPF", False, f"{domain}: no v=spf1 record; publish e.g. "
                                     "\"v=spf1 mx -all\"")
    return Finding("SPF", False, f"{domain}: {len(spf)} v=spf1 records (RFC 7208 4.5: "
                                 "permerror)")


def _dkim_finding(domain: str, selector: str, records: list[str],
                  pem: bytes | None) -> Finding:
    name = f"{selector}._domainkey.{domain}"
    keys = [r for r in records if "p=" in r]
    if not keys:
        hint = " (run `mailgrid dkim generate`)" if pem is None else \
            " (publish the record `mailgrid dkim generate` printed)"
        return Finding("DKIM", False, f"{name}: no key record{hint}")
    if pem is None:
        return Finding("DKIM", True, f"{name}: key published (we hold no key to sign with)")
    if _public_b64(pem) in [_p_tag(r) for r in keys]:
        return Finding("DKIM", True, f"{name}: matches our signing key")
    return Finding("DKIM", False, f"{name}: published key is not our signing key")


def _public_b64(pem: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _p_tag(record: str) -> str:
    for item in record.split(";"):
        name, _, value = item.partition("=")
        if name.strip() == "p":
            return "".join(value.split())
    return ""
