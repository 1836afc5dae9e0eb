"""A remote mail exchanger for tests: a real SMTP server process (aiosmtpd) on loopback.

    python -m tests.peers.smtp_peer --maildir DIR [--control FILE] [--starttls]
                                    [--host 127.0.0.1] [--port 0] [--discard]

Prints ``listening on HOST:PORT`` when it accepts connections. Each accepted message is
saved as ``DIR/<n>.eml`` (the bytes received, dot-unstuffed) with ``DIR/<n>.json`` (the
envelope, the EHLO name, whether TLS was on), both renamed into place once complete.

What it does for a recipient is read from the control file (JSON, re-read when it
changes) as a list of actions used one per transaction, the last one repeating:

    {"bob@example.org": ["rcpt:451", "rcpt:451", "accept"], "*": ["accept"]}

actions: ``accept``; ``rcpt:CODE`` (reply CODE to RCPT TO); ``data:CODE`` (reply CODE at
the end of DATA); ``drop:rcpt`` / ``drop:data`` (close the connection instead of
replying); ``slow:SECONDS`` (save the message, then wait before the 250, as a slow disk
would: a client that dies meanwhile has delivered it without knowing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import ssl
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

REPLIES = {
    421: "421 4.3.2 Service shutting down",
    450: "450 4.2.1 Mailbox busy, try later",
    451: "451 4.3.0 Temporary failure, try again later",
    452: "452 4.2.2 Mailbox full",
    550: "550 5.1.1 No such user here",
    552: "552 5.3.4 Message too big",
    554: "554 5.7.1 Message rejected",
}


class Behaviour:
    """The control file's per-recipient action lists, and how often each was used."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime = -1.0
        self._rules: dict[str, list[str]] = {}
        self._used: Counter[str] = Counter()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            self._rules = {k.lower(): list(v) for k, v in json.loads(self.path.read_text()).items()}
            self._mtime = mtime

    def next_action(self, rcpt: str) -> str:
        self._load()
        key = rcpt.lower() if rcpt.lower() in self._rules else "*"
        actions = self._rules.get(key) or ["accept"]
        index = min(self._used[rcpt.lower()], len(actions) - 1)
        self._used[rcpt.lower()] += 1
        return actions[index]


def reply(code: str) -> str:
    number = int(code[:3])
    return REPLIES.get(number, f"{number} {number // 100}.0.0 As you wish")


class Handler:
    def __init__(self, maildir: Path | None, behaviour: Behaviour) -> None:
        self.maildir = maildir
        self.behaviour = behaviour
        self.counter = itertools.count(1)
        # The action chosen at RCPT for each accepted recipient, per transaction.
        self.pending: dict[int, list[str]] = {}

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        action = self.behaviour.next_action(address)
        if action.startswith("rcpt:"):
            return reply(action[5:])
        if action == "drop:rcpt":
            server.transport.abort()
            return "421 4.4.2 gone"
        envelope.rcpt_tos.append(address)
        self.pending.setdefault(id(envelope), []).append(action)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        actions = self.pending.pop(id(envelope), [])
        special = next((a for a in actions if a != "accept"), "accept")
        if special.startswith("data:"):
            return reply(special[5:])
        if special == "drop:data":
            server.transport.abort()
            return "421 4.4.2 gone"
        name = self.save(session, envelope)
        if special.startswith("slow:"):
            await asyncio.sleep(float(special[5:]))
        return f"250 2.0.0 OK queued as {name}"

    def save(self, session: Session, envelope: Envelope) -> str:
        name = f"{time.time_ns()}-{next(self.counter):06d}"
        if self.maildir is None:
            return name
        content = envelope.original_content or b""
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                "helo": session.host_name, "tls": session.ssl is not None,
                "peer": list(session.peer) if session.peer else None}
        for suffix, data in ((".eml", content), (".json", json.dumps(meta).encode())):
            tmp = self.maildir / f".{name}{suffix}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.maildir / f"{name}{suffix}")
        return name


def self_signed_context(workdir: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for mx.peer.test."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.peer.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.peer.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "peer.crt", workdir / "peer.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


async def serve(args: argparse.Namespace) -> None:
    maildir: Path | None = None if args.discard else args.maildir
    handler = Handler(maildir, Behaviour(args.control))
    options: dict[str, Any] = {"hostname": "mx.peer.test", "decode_data": False,
                               "enable_SMTPUTF8": True}
    with tempfile.TemporaryDirectory() as tmp:
        if args.starttls:
            options.update(tls_context=self_signed_context(Path(tmp)),
                           require_starttls=False)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, **options),
                                          host=args.host, port=args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"listening on {args.host}:{port}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.smtp_peer")
    parser.add_argument("--maildir", type=Path, default=Path("peer-mail"))
    parser.add_argument("--control", type=Path, default=None)
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--discard", action="store_true", help="accept, save nothing")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    args.maildir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
