"""The submission port's TLS certificate: configured, or self-signed on first run.

Blocking (key generation, file I/O): call from a thread. Several gateways may start at
once on one data dir; the key and certificate live in ONE file created with a hard link
(atomic, fails if it exists), so every instance ends up with the same matching pair.
The certificate alone is also written next to it, for clients to pin.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailgrid.settings import Settings

log = logging.getLogger(__name__)

# A self-signed certificate for a test or a laptop: long-lived, nobody rotates it.
VALIDITY_DAYS = 3650
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def tls_dir(settings: Settings) -> Path:
    return settings.data_dir / "tls"


def self_signed_paths(settings: Settings) -> tuple[Path, Path]:
    """(key and certificate in one file, the certificate alone)."""
    base = tls_dir(settings)
    return base / "submission.pem", base / "submission.crt"


def server_context(settings: Settings) -> ssl.SSLContext:
    """The server-side context for STARTTLS (TLS 1.2 or later)."""
    if settings.submission_tls_cert:
        certfile = settings.submission_tls_cert
        keyfile: str | None = settings.submission_tls_key or None
    else:
        certfile, keyfile = str(ensure_self_signed(settings)), None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def ensure_self_signed(settings: Settings) -> Path:
    """The combined key+certificate file, generated if there is none yet."""
    combined, cert_only = self_signed_paths(settings)
    if not combined.exists():
        combined.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pem, cert_pem = generate(settings.server_name)
        fd, tmp = tempfile.mkstemp(dir=combined.parent, prefix=".submission-")
        try:
            with os.fdopen(fd, "wb") as out:  # mkstemp makes it 0600: the key is inside
                out.write(key_pem + cert_pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, combined)
                log.info("generated a self-signed certificate for %s in %s",
                         settings.server_name, combined)
            except FileExistsError:
                pass  # another instance made one first: use that one
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _write_cert_only(combined, cert_only)
    return combined


def _write_cert_only(combined: Path, cert_only: Path) -> None:
    data = combined.read_bytes()
    start = data.find(_PEM_CERT)
    if start < 0:
        raise ValueError(f"{combined} holds no certificate")
    cert = data[start:]
    if cert_only.exists() and cert_only.read_bytes() == cert:
        return
    fd, tmp = tempfile.mkstemp(dir=cert_only.parent, prefix=".submission-crt-")
    with os.fdopen(fd, "wb") as out:
        out.write(cert)
    os.chmod(tmp, 0o644)
    os.replace(tmp, cert_only)


def generate(server_name: str) -> tuple[bytes, bytes]:
    """A P-256 key and a self-signed certificate for ``server_name`` and loopback."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(server_name), x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
