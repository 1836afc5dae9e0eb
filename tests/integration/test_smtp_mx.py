"""The SMTP MX listener against real sockets, a real metadata_svc and a real nats-server.

Replies are compared with named constants (aiosmtpd's testing/statuscodes.py style);
every reply but the greeting and the EHLO lines carries an enhanced status code.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

import pytest
from argon2 import PasswordHasher
from nats.js import JetStreamContext

from delivery_svc.inbound import decode_jobs
from gateway.app import GatewayApp
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.natsd import NatsServer, free_port
from mailgrid.settings import Settings, split_host_port
from mailgrid.v1 import delivery_pb2, metadata_pb2
from metadata_svc.app import MetadataApp
from metadata_svc.store_sqlite import SQLiteMetadataStore

CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)

MAX_SIZE = 64 * 1024


class R(NamedTuple):
    """One SMTP reply: its code and the text of its last line."""

    code: int
    text: str


S220_GREETING = R(220, "mx.example.test mailgrid ESMTP")
S221_BYE = R(221, "2.0.0 Bye")
S250_OK = R(250, "2.0.0 Ok")
S250_MAIL_OK = R(250, "2.1.0 Ok")
S250_RCPT_OK = R(250, "2.1.5 Ok")
S354_DATA = R(354, "End data with <CR><LF>.<CR><LF>")
S451_TEMPORARY = R(451, "4.3.0")  # prefix: the text names the cause
S452_MAILBOX_FULL = R(452, "4.2.2 Mailbox full")
S452_TOO_MANY_RCPT = R(452, "4.5.3 Too many recipients")
S500_UNKNOWN_COMMAND = R(500, '5.5.2 Error: command "FROB" not recognized')
S500_LINE_TOO_LONG = R(500, "5.6.0 Line too long (see RFC5321 4.5.3.1.6)")
S503_NEED_MAIL = R(503, "5.5.1 Error: need MAIL command")
S550_BARE_CR_LF = R(550, "5.6.0 Message contains bare CR or LF (RFC 5321 2.3.8)")
S552_TOO_MUCH_DATA = R(552, "5.3.4 Error: Too much mail data")
S552_SIZE_PARAM = R(552, "5.3.4 Error: message size exceeds fixed maximum message size")
S554_LOOP = R(554, "5.4.6 Too many hops (mail loop)")
S554_RELAY_DENIED = R(554, "5.7.1 Relay access denied")
S554_ROUTING_DENIED = R(554, "5.7.1 Source routes and %-hack or !-path addresses "
                             "are not accepted")


def s550_user_unknown(address: str) -> R:
    return R(550, f"5.1.1 <{address}>: Recipient address rejected: User unknown")


QUEUED = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-F]{24})$")
RECEIVED = re.compile(
    rb"^Received: from client\.example\.net \([^ ()]+ \[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.example\.test \(mailgrid\) with ESMTP id (?P<id>[0-9A-F]{24})\r\n"
    rb"\tfor <bob@example\.test>; [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} "
    rb"\d{2}:\d{2}:\d{2} \+0000\r\n")


@dataclass
class Smtp:
    """A plain SMTP client on a real socket: exact bytes out, replies in."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_lines: list[str]

    @classmethod
    async def connect(cls, addr: str) -> tuple[Smtp, R]:
        host, port = split_host_port(addr)
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer, [])
        return client, await client.reply()

    async def reply(self) -> R:
        self.last_lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            assert line.endswith("\r\n"), f"connection closed or bad line: {line!r}"
            self.last_lines.append(line[4:-2])
            if line[3] == " ":
                return R(int(line[:3]), line[4:-2])

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> R:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def envelope(self, *rcpts: str, sender: str = "alice@example.net") -> None:
        assert await self.cmd("EHLO client.example.net") == R(250, "HELP")
        assert await self.cmd(f"MAIL FROM:<{sender}>") == S250_MAIL_OK
        for rcpt in rcpts:
            assert await self.cmd(f"RCPT TO:<{rcpt}>") == S250_RCPT_OK

    async def data(self, body: bytes) -> R:
        """DATA with ``body`` sent as is: the caller does any dot-stuffing."""
        assert await self.cmd("DATA") == S354_DATA
        await self.send(body + b".\r\n")
        return await self.reply()


@pytest.fixture
async def users(metadata: MetadataApp) -> AsyncIterator[MetadataClient]:
    """A client of metadata_svc with bob@example.test and carol@example.org."""
    async with MetadataClient(metadata.grpc_addr) as client:
        await client.create_user("bob@example.test", "bob-password")
        await client.create_user("carol@example.org", "carol-password")
        yield client


def gateway_settings(settings: Settings, nats_url: str, metadata_addr: str) -> Settings:
    return settings.model_copy(update={
        "nats_url": nats_url, "metadata_addr": metadata_addr, "max_message_size": MAX_SIZE,
    })


@pytest.fixture
async def gateway(settings: Settings, nats_url: str,
                  metadata: MetadataApp) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(gateway_settings(settings, nats_url, metadata.grpc_addr))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_url, "test-observer")
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def smtp(gateway: GatewayApp, users: MetadataClient) -> AsyncIterator[Smtp]:
    client, greeting = await Smtp.connect(gateway.smtp_addr)
    assert greeting == S220_GREETING
    yield client
    await client.close()


async def inbound_messages(js: JetStreamContext) -> list[list[delivery_pb2.InboundJob]]:
    """The jobs of each message on INBOUND (one, or a batch of several)."""
    info = await js.stream_info("INBOUND")
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg("INBOUND", seq)
        found.append(decode_jobs(msg.data or b"", msg.headers))
    return found


async def inbound_jobs(js: JetStreamContext) -> list[delivery_pb2.InboundJob]:
    return [job for jobs in await inbound_messages(js) for job in jobs]


async def job_raw(users: MetadataClient, job: delivery_pb2.InboundJob) -> bytes:
    """The raw message a job stands for: in the job when small, else in the blob store."""
    assert bool(job.raw) != bool(job.blob_key), "exactly one of raw and blob_key"
    return job.raw or await users.get_blob(job.blob_key)


MESSAGE = (b"From: Alice <alice@example.net>\r\n"
           b"To: Bob <bob@example.test>\r\n"
           b"Subject: hello\r\n"
           b"Message-ID: <m1@example.net>\r\n"
           b"\r\n"
           b"Hi Bob,\r\n"
           b"..a line that starts with a dot\r\n"
           b"caf\xc3\xa9 8-bit body\r\n")
# What the client meant: the transparent dot removed (RFC 5321 4.5.2).
MESSAGE_UNSTUFFED = MESSAGE.replace(b"\r\n..a line", b"\r\n.a line")


# ---- session and EHLO ----------------------------------------------------------------

async def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining_enhancedstatuscodes(
        smtp: Smtp) -> None:
    assert await smtp.cmd("EHLO client.example.net") == R(250, "HELP")
    keywords = smtp.last_lines[1:-1]
    assert keywords == [f"SIZE {MAX_SIZE}", "8BITMIME", "SMTPUTF8", "PIPELINING",
                        "ENHANCEDSTATUSCODES"]
    assert smtp.last_lines[0] == "mx.example.test"
    assert await smtp.cmd("QUIT") == S221_BYE


async def test_out_of_sequence_and_unknown_commands_get_enhanced_codes(smtp: Smtp) -> None:
    assert await smtp.cmd("EHLO client.example.net") == R(250, "HELP")
    assert await smtp.cmd("RCPT TO:<bob@example.test>") == S503_NEED_MAIL
    assert await smtp.cmd("FROB") == S500_UNKNOWN_COMMAND
    assert await smtp.cmd("NOOP") == S250_OK
    assert await smtp.cmd("RSET") == S250_OK


# ---- RCPT TO -------------------------------------------------------------------------

async def test_known_local_user_gets_250_2_1_5(smtp: Smtp) -> None:
    await smtp.envelope("bob@example.test", "carol@example.org")


async def test_unknown_local_user_gets_550_5_1_1(smtp: Smtp) -> None:
    await smtp.envelope()
    assert await smtp.cmd("RCPT TO:<nobody@example.test>") == s550_user_unknown(
        "nobody@example.test")


async def test_foreign_domain_gets_554_5_7_1_relay_denied(smtp: Smtp) -> None:
    await smtp.envelope()
    assert await smtp.cmd("RCPT TO:<someone@elsewhere.example>") == S554_RELAY_DENIED
    assert await smtp.cmd("RCPT TO:<bob@[127.0.0.1]>") == S554_RELAY_DENIED


@pytest.mark.parametrize("rcpt", [
    "<bob%elsewhere.example@example.test>",    # percent hack
    "<elsewhere.example!bob@example.test>",    # bang path
    '<"bob@elsewhere.example"@example.test>',  # quoted @
    "<@example.test:bob@elsewhere.example>",   # source route
    "<@relay.example:bob@example.test>",       # source route to a local user
    '<"bob%elsewhere.example"@example.test>',  # quoted percent hack
])
async def test_relay_tricks_get_554_5_7_1(smtp: Smtp, rcpt: str) -> None:
    await smtp.envelope()
    assert await smtp.cmd(f"RCPT TO:{rcpt}") == S554_ROUTING_DENIED


@pytest.mark.parametrize("rcpt", [
    "someone@elsewhere.example",               # unbracketed foreign address
    "bob%elsewhere.example@example.test",      # unbracketed percent hack
    "elsewhere.example!bob@example.test",      # unbracketed bang path
    "<someone@elsewhere.example.>",            # foreign domain with a trailing dot
    "<someone@[192.0.2.1]>",                   # address literal
    "<>",                                      # the null sender as a recipient
    "<bob%elsewhere.example>",                 # percent hack with no domain at all
    "<elsewhere.example!bob>",                 # bare bang path
    "<bob@example.test",                       # unbalanced bracket
])
async def test_open_relay_probes_all_get_5xx(smtp: Smtp, js: JetStreamContext,
                                             rcpt: str) -> None:
    await smtp.envelope()
    reply = await smtp.cmd(f"RCPT TO:{rcpt}")
    assert 500 <= reply.code < 600, reply
    assert await smtp.cmd("DATA") == R(503, "5.5.1 Error: need RCPT command")
    assert await inbound_jobs(js) == []


async def test_user_over_quota_gets_452_4_2_2(smtp: Smtp, users: MetadataClient) -> None:
    user = await users.create_user("full@example.test", "full-password", quota_bytes=10)
    put = await users.put_blob(b"x" * 10)
    await users.store_delivery(metadata_pb2.StoreDeliveryRequest(
        user_id=user.user_id, delivery_key="fill", blob_key=put.blob_key, size=10))
    await smtp.envelope()
    assert await smtp.cmd("RCPT TO:<full@example.test>") == S452_MAILBOX_FULL


async def test_the_101st_recipient_gets_452_4_5_3(smtp: Smtp, metadata: MetadataApp) -> None:
    addresses = [f"u{n}@example.test" for n in range(101)]
    # 101 users through the service would cost 101 full argon2 hashes: write them
    # straight into its database with a cheap hasher instead (SQLite serialises writers).
    store = await SQLiteMetadataStore.open(metadata.settings.metadata_db_path, hasher=CHEAP)
    try:
        for address in addresses:
            await store.create_user(address, "pw-" + address)
    finally:
        await store.close()
    await smtp.envelope(*addresses[:100])
    assert await smtp.cmd(f"RCPT TO:<{addresses[100]}>") == S452_TOO_MANY_RCPT
    # A repeat of an accepted recipient is still fine: it takes no new place.
    assert await smtp.cmd(f"RCPT TO:<{addresses[0]}>") == S250_RCPT_OK


async def test_metadata_down_at_rcpt_gets_451_4_3_0(
        settings: Settings, nats_url: str) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    app = GatewayApp(gateway_settings(settings, nats_url, nowhere))
    await app.start()
    try:
        client, _ = await Smtp.connect(app.smtp_addr)
        await client.envelope()
        reply = await client.cmd("RCPT TO:<bob@example.test>")
        assert (reply.code, reply.text[:5]) == (S451_TEMPORARY.code, S451_TEMPORARY.text)
        await client.close()
    finally:
        await app.stop()


# ---- MAIL FROM and DATA limits -------------------------------------------------------

async def test_size_parameter_over_the_limit_gets_552_5_3_4(smtp: Smtp) -> None:
    assert await smtp.cmd("EHLO client.example.net") == R(250, "HELP")
    assert await smtp.cmd(f"MAIL FROM:<a@example.net> SIZE={MAX_SIZE + 1}") == S552_SIZE_PARAM


async def test_data_over_the_limit_gets_552_5_3_4_and_nothing_is_queued(
        smtp: Smtp, js: JetStreamContext) -> None:
    await smtp.envelope("bob@example.test")
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    assert await smtp.data(body * (MAX_SIZE // 1000 + 1)) == S552_TOO_MUCH_DATA
    assert await inbound_jobs(js) == []


@pytest.mark.parametrize("body", [
    b"Subject: lf\r\n\r\nbare\nline feed\r\n",
    b"Subject: cr\r\n\r\nbare\rcarriage return\r\n",
])
async def test_bare_cr_or_lf_gets_550_5_6_0_and_nothing_is_queued(
        smtp: Smtp, js: JetStreamContext, body: bytes) -> None:
    await smtp.envelope("bob@example.test")
    assert await smtp.data(body) == S550_BARE_CR_LF
    assert await inbound_jobs(js) == []


async def test_51_received_headers_get_554_5_4_6(smtp: Smtp, js: JetStreamContext) -> None:
    await smtp.envelope("bob@example.test")
    hops = b"".join(b"Received: from hop%d.example by x; Wed, 1 May 2024 00:00:00 +0000\r\n"
                    % n for n in range(51))
    assert await smtp.data(hops + b"Subject: loop\r\n\r\nround and round\r\n") == S554_LOOP
    assert await inbound_jobs(js) == []


# The nine end-of-data look-alikes of SMTP smuggling (SEC Consult, 2023): only
# <CR><LF>.<CR><LF> ends DATA (RFC 5321 4.1.1.4); each of these is a bare CR or LF.
SMUGGLED_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                 b"\n.\r", b"\r.\n", b"\r\n.\r\r\n"]


@pytest.mark.parametrize("smuggled_end", SMUGGLED_ENDS)
async def test_smuggled_end_of_data_stays_inside_the_one_message(
        smtp: Smtp, js: JetStreamContext, smuggled_end: bytes) -> None:
    await smtp.envelope("bob@example.test")
    smuggled = (b"Subject: first\r\n\r\nbody" + smuggled_end
                + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<carol@example.org>\r\n"
                + b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n")
    assert await smtp.data(smuggled) == S550_BARE_CR_LF
    # No reply to a smuggled command is waiting: the next reply answers our NOOP.
    assert await smtp.cmd("NOOP") == S250_OK
    assert await inbound_jobs(js) == []


# ---- accepting a message -------------------------------------------------------------

async def test_a_good_message_is_stored_with_our_received_header_and_queued_once(
        smtp: Smtp, js: JetStreamContext, users: MetadataClient) -> None:
    await smtp.envelope("Bob@EXAMPLE.TEST")
    reply = await smtp.data(MESSAGE)
    queued = QUEUED.match(reply.text)
    assert reply.code == 250 and queued, reply
    queue_id = queued.group(1)

    [job] = await inbound_jobs(js)
    assert job.queue_id == queue_id
    assert job.mail_from == "alice@example.net"
    assert list(job.rcpt_to) == ["Bob@example.test"]
    assert job.client_address == "127.0.0.1"
    assert job.helo == "client.example.net"
    assert job.received_at.seconds > 0

    assert job.raw and not job.blob_key  # small: it travels in the job
    blob = job.raw
    assert job.size == len(blob)
    header = RECEIVED.match(blob.replace(b"<Bob@example.test>", b"<bob@example.test>"))
    assert header is not None, blob[:400]
    assert header.group("id").decode() == queue_id
    assert blob[header.end():] == MESSAGE_UNSTUFFED


async def test_a_message_over_the_inline_limit_is_in_the_blob_store_before_250(
        settings: Settings, nats_url: str, metadata: MetadataApp, users: MetadataClient,
        js: JetStreamContext) -> None:
    limited = gateway_settings(settings, nats_url, metadata.grpc_addr).model_copy(
        update={"inbound_inline_max_bytes": 1024})
    app = GatewayApp(limited)
    await app.start()
    try:
        client, _ = await Smtp.connect(app.smtp_addr)
        await client.envelope("bob@example.test")
        body = b"Subject: big\r\n\r\n" + b"z" * 2000 + b"\r\n"
        reply = await client.data(body)
        assert reply.code == 250 and QUEUED.match(reply.text)
        await client.close()
    finally:
        await app.stop()
    [job] = await inbound_jobs(js)
    assert job.blob_key and not job.raw
    stored = await users.get_blob(job.blob_key)
    assert stored.endswith(body) and job.size == len(stored)


async def test_the_null_sender_and_a_repeated_recipient_make_one_job(
        smtp: Smtp, js: JetStreamContext) -> None:
    await smtp.envelope("bob@example.test", "bob@example.test", "carol@example.org",
                        sender="")
    reply = await smtp.data(b"Subject: bounce\r\n\r\nundeliverable\r\n")
    assert reply.code == 250 and QUEUED.match(reply.text)
    [job] = await inbound_jobs(js)
    assert job.mail_from == ""
    assert list(job.rcpt_to) == ["bob@example.test", "carol@example.org"]


async def test_pipelined_commands_in_one_write_are_answered_in_order(
        smtp: Smtp, js: JetStreamContext) -> None:
    assert await smtp.cmd("EHLO client.example.net") == R(250, "HELP")
    await smtp.send(b"MAIL FROM:<alice@example.net>\r\n"
                    b"RCPT TO:<bob@example.test>\r\n"
                    b"RCPT TO:<nobody@example.test>\r\n"
                    b"RCPT TO:<carol@example.org>\r\n"
                    b"DATA\r\n")
    assert await smtp.reply() == S250_MAIL_OK
    assert await smtp.reply() == S250_RCPT_OK
    assert await smtp.reply() == s550_user_unknown("nobody@example.test")
    assert await smtp.reply() == S250_RCPT_OK
    assert await smtp.reply() == S354_DATA
    await smtp.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    reply = await smtp.reply()
    assert reply.code == 250 and QUEUED.match(reply.text)
    assert await smtp.reply() == S221_BYE
    [job] = await inbound_jobs(js)
    assert list(job.rcpt_to) == ["bob@example.test", "carol@example.org"]


async def test_nats_down_at_data_gets_451_4_3_0_and_a_retry_later_gets_250(
        smtp: Smtp, js: JetStreamContext, nats_server: NatsServer,
        gateway: GatewayApp) -> None:
    await smtp.envelope("bob@example.test")
    await asyncio.to_thread(nats_server.stop)
    reply = await smtp.data(b"Subject: try later\r\n\r\nbody\r\n")
    assert (reply.code, reply.text[:5]) == (S451_TEMPORARY.code, S451_TEMPORARY.text)

    await nats_server.start()
    await wait_for_nats(gateway)
    await smtp.envelope("bob@example.test")
    reply = await smtp.data(b"Subject: try later\r\n\r\nbody\r\n")
    assert reply.code == 250 and QUEUED.match(reply.text)


async def wait_for_nats(gateway: GatewayApp) -> None:
    for _ in range(200):
        if (await gateway.readiness())["nats"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway did not reconnect to NATS")


# ---- lines and shutdown --------------------------------------------------------------

async def test_lines_longer_than_rfc_5321_but_within_max_line_length_are_accepted(
        smtp: Smtp, js: JetStreamContext, users: MetadataClient) -> None:
    await smtp.envelope("bob@example.test")
    body = b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n"
    reply = await smtp.data(body)
    assert reply.code == 250 and QUEUED.match(reply.text)
    [job] = await inbound_jobs(js)
    assert (await job_raw(users, job)).endswith(body)


async def test_a_line_over_max_line_length_gets_500_5_6_0(
        smtp: Smtp, js: JetStreamContext, settings: Settings) -> None:
    await smtp.envelope("bob@example.test")
    line = b"z" * (settings.max_line_length + 10) + b"\r\n"
    assert await smtp.data(b"Subject: longer\r\n\r\n" + line) == S500_LINE_TOO_LONG
    assert await smtp.cmd("NOOP") == S250_OK
    assert await inbound_jobs(js) == []


async def test_stop_refuses_new_connections_but_lets_a_data_in_flight_finish(
        smtp: Smtp, gateway: GatewayApp, js: JetStreamContext) -> None:
    await smtp.envelope("bob@example.test")
    assert await smtp.cmd("DATA") == S354_DATA
    await smtp.send(b"Subject: in flight\r\n\r\nfirst half")
    stopping = asyncio.create_task(gateway.stop())
    host, port = split_host_port(gateway.smtp_addr)
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            break
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the listener still accepts connections while stopping")
    await smtp.send(b", second half\r\n.\r\n")
    reply = await smtp.reply()
    assert reply.code == 250 and QUEUED.match(reply.text)
    await stopping
    assert len(await inbound_jobs(js)) == 1
