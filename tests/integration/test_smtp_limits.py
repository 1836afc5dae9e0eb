"""Limits of the SMTP edge against real sockets: command length, error budget, idle and
slow-drip timeouts, connections per client, and STARTTLS command injection.

Each guarantee has one test named for it; the limits are shrunk through settings so that
the tests are quick, the code paths are the production ones.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js import JetStreamContext

from gateway.app import GatewayApp
from mailgrid.clients import MetadataClient
from mailgrid.settings import Settings, split_host_port
from metadata_svc.app import MetadataApp
from tests.integration.test_smtp_mx import (
    S220_GREETING,
    S250_OK,
    S354_DATA,
    S503_NEED_MAIL,
    R,
    Smtp,
    gateway_settings,
    inbound_jobs,
)

S421_TIMEOUT = R(421, "4.4.2 Timeout, closing connection")
S421_TOO_MANY_ERRORS = R(421, "4.7.0 Too many errors, closing connection")
S421_TOO_MANY_CONNECTIONS = R(421, "4.7.0 Too many connections from your address, try later")
S500_COMMAND_TOO_LONG = R(500, "5.5.2 Command line too long")
MAX_CONNECTIONS = 3


async def start_gateway(settings: Settings, nats_url: str, metadata: MetadataApp,
                        **limits: Any) -> GatewayApp:
    base = gateway_settings(settings, nats_url, metadata.grpc_addr)
    app = GatewayApp(base.model_copy(update=limits))
    await app.start()
    return app


@pytest.fixture
async def gateway(settings: Settings, nats_url: str,
                  metadata: MetadataApp) -> AsyncIterator[GatewayApp]:
    app = await start_gateway(settings, nats_url, metadata,
                              smtp_max_connections_per_ip=MAX_CONNECTIONS)
    yield app
    await app.stop()


@pytest.fixture
async def hasty_gateway(settings: Settings, nats_url: str,
                        metadata: MetadataApp) -> AsyncIterator[GatewayApp]:
    """A gateway with an idle timeout of half a second and a DATA deadline of one."""
    app = await start_gateway(settings, nats_url, metadata,
                              smtp_idle_timeout=0.5, smtp_data_timeout=1.0)
    yield app
    await app.stop()


@pytest.fixture
async def users(metadata: MetadataApp) -> AsyncIterator[MetadataClient]:
    async with MetadataClient(metadata.grpc_addr) as client:
        await client.create_user("bob@example.test", "bob-password")
        yield client


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    from mailgrid import bus
    nc = await bus.connect(nats_url, "test-observer")
    yield nc.jetstream()
    await nc.close()


async def connect(addr: str) -> Smtp:
    client, greeting = await Smtp.connect(addr)
    assert greeting == S220_GREETING
    return client


async def assert_closed(client: Smtp) -> None:
    """The server has closed the connection: EOF, no further reply."""
    assert await asyncio.wait_for(client.reader.read(), 30) == b""


async def test_a_command_line_over_512_octets_gets_500_5_5_2_and_the_session_goes_on(
        gateway: GatewayApp, settings: Settings) -> None:
    # RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
    client = await connect(gateway.smtp_addr)
    assert await client.cmd("EHLO client.example.net") == R(250, "HELP")
    assert await client.cmd("NOOP " + "x" * 600) == S500_COMMAND_TOO_LONG
    # Longer than the reader's own buffer (max_line_length): read through, then 500.
    assert await client.cmd("NOOP " + "x" * (settings.max_line_length + 100)) \
        == S500_COMMAND_TOO_LONG
    assert await client.cmd("NOOP") == S250_OK
    await client.close()


async def test_the_20th_error_reply_is_followed_by_421_4_7_0_and_close(
        gateway: GatewayApp, settings: Settings) -> None:
    client = await connect(gateway.smtp_addr)
    assert await client.cmd("EHLO client.example.net") == R(250, "HELP")
    for _ in range(settings.smtp_max_errors - 1):
        assert await client.cmd("RCPT TO:<bob@example.test>") == S503_NEED_MAIL
    assert await client.cmd("RCPT TO:<bob@example.test>") == S503_NEED_MAIL
    assert await client.reply() == S421_TOO_MANY_ERRORS
    await assert_closed(client)


async def test_an_idle_client_gets_421_4_4_2_and_is_closed(hasty_gateway: GatewayApp) -> None:
    client = await connect(hasty_gateway.smtp_addr)
    assert await client.reply() == S421_TIMEOUT
    await assert_closed(client)


async def test_a_client_busy_past_the_idle_timeout_is_served_then_timed_out_when_quiet(
        hasty_gateway: GatewayApp) -> None:
    """Each command moves the idle deadline on (gateway.smtp_timeout keeps one timer per
    session, which finds the deadline moved when it fires and waits again)."""
    client = await connect(hasty_gateway.smtp_addr)
    (session,) = hasty_gateway._smtp.sessions
    timer = session._timeout_handle
    for _ in range(6):  # 1.2 s in all, more than twice the half-second idle timeout
        await asyncio.sleep(0.2)
        assert await client.cmd("NOOP") == S250_OK
    assert session._timeout_handle is not timer  # the first timer fired and re-armed
    assert await client.reply() == S421_TIMEOUT
    await assert_closed(client)


async def test_commands_move_the_idle_deadline_without_a_new_timer(
        gateway: GatewayApp) -> None:
    client = await connect(gateway.smtp_addr)
    (session,) = gateway._smtp.sessions
    timer = session._timeout_handle
    deadline = session._deadline
    assert await client.cmd("EHLO client.example.net") == R(250, "HELP")
    for _ in range(5):
        assert await client.cmd("NOOP") == S250_OK
    assert session._timeout_handle is timer
    assert not timer.cancelled()
    assert session._deadline > deadline
    await client.close()


async def test_a_command_dripped_byte_by_byte_gets_421_4_4_2(
        hasty_gateway: GatewayApp) -> None:
    # Only a whole valid command resets the idle timer; bytes of a line do not.
    client = await connect(hasty_gateway.smtp_addr)
    drip = asyncio.create_task(dribble(client, b"NOOP" * 1000))
    try:
        assert await client.reply() == S421_TIMEOUT
    finally:
        drip.cancel()
    await assert_closed(client)


async def test_a_data_trickling_past_the_data_deadline_gets_421_4_4_2_and_nothing_queued(
        hasty_gateway: GatewayApp, users: MetadataClient, js: JetStreamContext) -> None:
    client = await connect(hasty_gateway.smtp_addr)
    await client.envelope("bob@example.test")
    assert await client.cmd("DATA") == S354_DATA
    # A line at a time, each well inside the idle timeout: only the DATA deadline ends it.
    drip = asyncio.create_task(dribble(client, b"Subject: slow\r\n\r\n" + b"line\r\n" * 10_000,
                                       step=6))
    try:
        assert await client.reply() == S421_TIMEOUT
    finally:
        drip.cancel()
    await assert_closed(client)
    assert await inbound_jobs(js) == []


async def dribble(client: Smtp, data: bytes, step: int = 1) -> None:
    """Sends ``data`` a few bytes at a time, with a pause between (a slowloris)."""
    for start in range(0, len(data), step):
        client.writer.write(data[start:start + step])
        await asyncio.sleep(0.1)


async def test_connections_over_the_per_client_cap_get_421_4_7_0_before_the_greeting(
        gateway: GatewayApp) -> None:
    clients = [await connect(gateway.smtp_addr) for _ in range(MAX_CONNECTIONS)]
    refused, greeting = await Smtp.connect(gateway.smtp_addr)
    assert greeting == S421_TOO_MANY_CONNECTIONS
    await assert_closed(refused)
    # The others are unharmed, and a slot freed is a slot available again.
    assert await clients[0].cmd("NOOP") == S250_OK
    await clients[0].cmd("QUIT")
    await assert_closed(clients[0])
    for _ in range(100):
        again, greeting = await Smtp.connect(gateway.smtp_addr)
        if greeting == S220_GREETING:
            break
        await asyncio.sleep(0.02)
    assert greeting == S220_GREETING
    for client in [*clients[1:], again]:
        await client.close()


async def test_commands_pipelined_after_starttls_are_discarded_not_run_under_tls(
        gateway: GatewayApp) -> None:
    # RFC 3207 4.2 and CVE-2011-0411: plaintext sent with STARTTLS must not be replayed
    # as if it came over the encrypted channel.
    client = await connect(gateway.submission_addr)
    assert (await client.cmd("EHLO client.example.net")).code == 250
    await client.send(b"STARTTLS\r\nNOOP\r\n")
    assert await client.reply() == R(220, "Ready to start TLS")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    host, _ = split_host_port(gateway.submission_addr)
    await client.writer.start_tls(context, server_hostname=host)
    # Were the NOOP run, its "250 2.0.0 Ok" would come before the EHLO reply.
    reply = await client.cmd("EHLO client.example.net")
    assert reply.code == 250 and client.last_lines[0] == "mx.example.test", client.last_lines
    assert "AUTH LOGIN PLAIN" in client.last_lines
    assert await client.cmd("NOOP") == S250_OK
    await client.close()
