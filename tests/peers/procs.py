"""Starting the test peers (tests/peers/*.py) as processes, and reading what they got.

``SmtpPeer.start(tmp)`` / ``DnsPeer.start(tmp, zone)`` return once the peer listens;
``stop()`` ends it (SIGTERM, then SIGKILL). The fixtures at the bottom start any number of
them per test on free loopback ports and stop them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


@dataclass
class PeerProcess:
    process: subprocess.Popen[str]
    host: str
    port: int
    log_path: Path

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def launch(module: str, args: list[str], workdir: Path) -> tuple[subprocess.Popen[str],
                                                                  str, int, Path]:
    """Runs ``python -m module args`` and waits for its ``listening on HOST:PORT`` line."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "stderr.log"
    with log_path.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=err, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()
        if line.startswith("listening on "):
            host, _, port = line.removeprefix("listening on ").strip().rpartition(":")
            return process, host, int(port), log_path
    process.kill()
    process.wait()
    raise RuntimeError(f"{module} did not start: {line!r}\n{log_path.read_text()}")


@dataclass
class SmtpPeer(PeerProcess):
    maildir: Path = Path()
    control: Path = Path()

    @classmethod
    def start(cls, workdir: Path, *, host: str = "127.0.0.1", port: int = 0,
              starttls: bool = False, discard: bool = False,
              behaviour: dict[str, list[str]] | None = None) -> SmtpPeer:
        maildir, control = workdir / "mail", workdir / "control.json"
        workdir.mkdir(parents=True, exist_ok=True)
        control.write_text(json.dumps(behaviour or {}))
        args = ["--maildir", str(maildir), "--control", str(control),
                "--host", host, "--port", str(port)]
        args += ["--starttls"] * starttls + ["--discard"] * discard
        process, bound_host, bound_port, log_path = launch("tests.peers.smtp_peer", args,
                                                           workdir)
        return cls(process, bound_host, bound_port, log_path, maildir, control)

    def behave(self, behaviour: dict[str, list[str]]) -> None:
        """Replaces the per-recipient actions (the peer re-reads the file)."""
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(behaviour))
        tmp.replace(self.control)

    def messages(self) -> list[Received]:
        """Every message saved so far, oldest first."""
        if not self.maildir.exists():
            return []
        found = []
        for meta_path in sorted(self.maildir.glob("*.json")):
            eml = meta_path.with_suffix(".eml")
            if eml.exists():
                found.append(Received(eml.read_bytes(), json.loads(meta_path.read_text())))
        return found


@dataclass
class Received:
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rcpt_tos(self) -> list[str]:
        return list(self.meta["rcpt_tos"])


@dataclass
class DnsPeer(PeerProcess):
    @classmethod
    def start(cls, workdir: Path, zone: str) -> DnsPeer:
        workdir.mkdir(parents=True, exist_ok=True)
        zone_path = workdir / "test.zone"
        zone_path.write_text(zone)
        process, host, port, log_path = launch("tests.peers.dns_server",
                                               ["--zone", str(zone_path)], workdir)
        return cls(process, host, port, log_path)


StartSmtpPeer = Callable[..., SmtpPeer]
StartDnsPeer = Callable[[str], DnsPeer]


@pytest.fixture
def smtp_peers(tmp_path: Path) -> Iterator[StartSmtpPeer]:
    """``smtp_peers(starttls=..., behaviour=..., host=..., port=...)`` starts one more."""
    peers: list[SmtpPeer] = []

    def start(**kwargs: Any) -> SmtpPeer:
        peer = SmtpPeer.start(tmp_path / f"smtp-peer-{len(peers)}", **kwargs)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        with contextlib.suppress(Exception):
            peer.stop()


@pytest.fixture
def dns_peers(tmp_path: Path) -> Iterator[StartDnsPeer]:
    """``dns_peers(zone_text)`` starts a DNS server answering from that zone."""
    peers: list[DnsPeer] = []

    def start(zone: str) -> DnsPeer:
        peer = DnsPeer.start(tmp_path / f"dns-peer-{len(peers)}", zone)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        with contextlib.suppress(Exception):
            peer.stop()
