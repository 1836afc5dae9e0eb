"""Fixtures every test layer shares: a real nats-server, settings on a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailgrid import bus
from mailgrid.natsd import NatsServer
from mailgrid.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a fresh store, stopped after the test."""
    server = NatsServer(store_dir=tmp_path / "nats")
    yield server
    server.stop()


@pytest.fixture
async def nats_url(nats_server: NatsServer) -> AsyncIterator[str]:
    """The URL of a started nats-server whose mailgrid streams exist."""
    url = await nats_server.start()
    nc = await bus.connect(url, "test-setup")
    try:
        await bus.ensure_streams(nc.jetstream())
    finally:
        await nc.close()
    yield url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a temp data dir, every listener on a free loopback port."""
    return Settings(
        data_dir=tmp_path / "data",
        http_addr="127.0.0.1:0",
        smtp_addr="127.0.0.1:0",
        submission_addr="127.0.0.1:0",
        domains=["example.test", "example.org"],
        hostname="mx.example.test",
        token_secret="test-secret-" + "x" * 32,
        # SPF/DKIM/DMARC would ask this machine's resolver about the test domains: only the
        # tests of those checks turn them on, with a DNS server of their own on loopback.
        inbound_auth_checks=False,
    )
