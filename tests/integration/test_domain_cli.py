"""`mailgrid dkim generate` and `mailgrid domain check` against a real DNS server."""

from __future__ import annotations

import re
from pathlib import Path

import dkim
import dns.resolver
import pytest

from delivery_svc.dkim_sign import DkimSigner
from mailgrid.cli import main
from tests.peers.procs import StartDnsPeer, dns_peers

__all__ = ["dns_peers"]  # fixtures


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILGRID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MAILGRID_DOMAINS", "example.test")
    return tmp_path / "data"


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["dkim", "generate", *args]) == 0
    return capsys.readouterr().out


def zone_line(output: str) -> str:
    """The printed record as a zone-file line the test DNS server reads."""
    record = output.strip().splitlines()[-1]
    match = re.fullmatch(r"(\S+) IN TXT \( (.*) \)", record)
    assert match, record
    return f"{match.group(1)} 60 IN TXT {match.group(2)}"


def test_generated_key_signs_mail_that_verifies_against_the_printed_record(
        data_dir: Path, capsys: pytest.CaptureFixture[str], dns_peers: StartDnsPeer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate(capsys, "Example.TEST", "--bits", "1024")
    key = data_dir / "dkim" / "example.test.key"
    assert f"wrote {key}" in out and key.stat().st_mode & 0o777 == 0o600
    peer = dns_peers(zone_line(out) + "\n")
    signer = DkimSigner(data_dir / "dkim", "mail")
    raw = b"From: a@example.test\r\nTo: b@else.test\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = signer.sign(raw)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = [peer.host], peer.port
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)  # type: ignore[attr-defined]

    assert dkim.verify(signed, dnsfunc=lookup)


def test_existing_key_is_not_replaced_without_force(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(capsys, "example.test", "--bits", "1024", "--selector", "s2")
    path = data_dir / "dkim" / "s2._domainkey.example.test.key"
    before = path.read_bytes()
    assert main(["dkim", "generate", "example.test", "--selector", "s2"]) == 1
    assert "exists (use --force" in capsys.readouterr().err
    assert path.read_bytes() == before
    generate(capsys, "example.test", "--bits", "1024", "--selector", "s2", "--force")
    assert path.read_bytes() != before


def test_bad_domain_is_refused(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dkim", "generate", "../etc"]) == 1
    assert "not a domain name" in capsys.readouterr().err


def test_domain_check_reports_what_is_published_and_what_is_missing(
        data_dir: Path, capsys: pytest.CaptureFixture[str], dns_peers: StartDnsPeer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate(capsys, "example.test", "--bits", "1024")
    peer = dns_peers("\n".join([
        zone_line(out),
        'example.test. 60 IN TXT "v=spf1 mx -all"',
        'half.test. 60 IN TXT "v=spf1 -all"',
        'half.test. 60 IN TXT "google-site-verification=xyz"',
    ]) + "\n")
    monkeypatch.setenv("MAILGRID_OUTBOUND_NAMESERVER", f"{peer.host}:{peer.port}")

    assert main(["domain", "check", "example.test"]) == 1
    report = capsys.readouterr().out
    assert "SPF    ok       example.test: v=spf1 mx -all" in report
    assert "DKIM   ok       mail._domainkey.example.test: matches our signing key" in report
    assert "DMARC  MISSING  _dmarc.example.test: no v=DMARC1 record" in report
    assert report.strip().endswith("missing or wrong: DMARC")

    assert main(["domain", "check", "half.test"]) == 1
    report = capsys.readouterr().out
    assert "SPF    ok" in report
    assert "mail._domainkey.half.test: no key record (run `mailgrid dkim generate`)" in report
    assert report.strip().endswith("missing or wrong: DKIM, DMARC")


def test_domain_check_passes_when_all_three_are_published(
        data_dir: Path, capsys: pytest.CaptureFixture[str], dns_peers: StartDnsPeer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate(capsys, "example.test", "--bits", "1024")
    peer = dns_peers("\n".join([
        zone_line(out), 'example.test. 60 IN TXT "v=spf1 mx -all"',
        '_dmarc.example.test. 60 IN TXT "v=DMARC1; p=reject"']) + "\n")
    monkeypatch.setenv("MAILGRID_OUTBOUND_NAMESERVER", f"{peer.host}:{peer.port}")
    assert main(["domain", "check", "example.test"]) == 0
    assert capsys.readouterr().out.strip().endswith("SPF, DKIM and DMARC are all published")
