"""Outbound delivery against real peers: a DNS server and SMTP servers in their own
processes on loopback, a real nats-server and a real metadata_svc."""

from __future__ import annotations

import asyncio
import base64
import email
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email import policy
from email.message import EmailMessage, Message
from typing import Any, TypeVar

import dkim
import dns.resolver
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from delivery_svc.outbound import DEAD_SUBJECT, outbound_subject
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import NotFound, Unavailable
from mailgrid.grpcutil import call, channel
from mailgrid.natsd import free_port
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, delivery_pb2, delivery_pb2_grpc
from metadata_svc.app import MetadataApp
from tests.peers.procs import (
    SmtpPeer,
    StartDnsPeer,
    StartSmtpPeer,
    dns_peers,
    smtp_peers,
)

__all__ = ["dns_peers", "smtp_peers"]  # fixtures

T = TypeVar("T")
PASSWORD = "correct horse battery staple"
SENDER = "alice@example.test"
StartDelivery = Callable[..., Awaitable[DeliveryApp]]


@pytest.fixture
def app_settings(settings: Settings, nats_url: str) -> Settings:
    # Quick retries: the backoff has the same shape, in tenths of seconds.
    return settings.model_copy(update={
        "nats_url": nats_url, "inbound_workers": 1, "outbound_workers": 2,
        "outbound_retry_delay": 0.2, "outbound_retry_max_delay": 1.0,
        "outbound_connect_timeout": 5.0, "outbound_command_timeout": 10.0,
        "outbound_ack_wait": 10.0,
    })


@pytest.fixture
async def start_delivery(app_settings: Settings, metadata: MetadataApp
                         ) -> AsyncIterator[StartDelivery]:
    """``await start_delivery(outbound_routes=...)``: delivery_svc with those settings."""
    apps: list[DeliveryApp] = []

    async def start(**updates: Any) -> DeliveryApp:
        app = DeliveryApp(app_settings.model_copy(
            update={"metadata_addr": metadata.grpc_addr, **updates}))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await bus.connect(nats_url, "test")
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def alice(metadata_client: MetadataClient) -> common_pb2.User:
    return await metadata_client.create_user(SENDER, PASSWORD)


# helpers


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str,
                     timeout: float = 30.0) -> T:
    """Polls ``probe`` until it returns something truthy (a wait, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            result = await probe()
        except Unavailable:
            result = None
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def make_message(subject: str, to: str = "bob@example.net", body: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <{SENDER}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Tue, 10 May 2005 11:26:39 -0600"
    msg["Message-ID"] = f"<{abs(hash(subject))}@example.test>"
    msg.set_content(body or f"Body of {subject}.\n")
    return msg.as_bytes(policy=policy.SMTP)


async def queue_job(js: JetStreamContext, client: MetadataClient, user: common_pb2.User,
                    raw: bytes, rcpts: list[str], *, job_id: str,
                    mail_from: str = SENDER, age: float = 0.0) -> delivery_pb2.OutboundJob:
    """Publishes an OutboundJob as SubmitMessage does (blob first, then the job)."""
    stored = await client.put_blob(raw)
    domain = rcpts[0].rpartition("@")[2]
    job = delivery_pb2.OutboundJob(
        job_id=job_id, blob_key=stored.blob_key, size=len(raw), mail_from=mail_from,
        sender_user_id=user.user_id, domain=domain, rcpt_to=rcpts,
        message_id=f"<{job_id}@example.test>")
    job.queued_at.FromNanoseconds(int((time.time() - age) * 1e9))
    await bus.publish(js, outbound_subject(domain), job.SerializeToString(), job_id)
    return job


async def outbound_empty(js: JetStreamContext) -> bool:
    """Every job settled: a work-queue stream forgets a message once it is acked."""
    return (await js.stream_info("OUTBOUND")).state.messages == 0


async def dead_letters(js: JetStreamContext) -> list[delivery_pb2.DeadLetter]:
    letters = []
    info = await js.stream_info("DEAD")
    seq = info.state.first_seq
    while info.state.messages:
        try:
            raw = await js.get_msg("DEAD", seq=seq, subject=DEAD_SUBJECT, next=True)
        except Exception:
            break
        letters.append(delivery_pb2.DeadLetter.FromString(raw.data or b""))
        seq = (raw.seq or seq) + 1
    return letters


async def inbox_raw(client: MetadataClient, user: common_pb2.User) -> list[bytes]:
    reply = await client.list_messages(user.user_id, "inbox", page_size=100)
    found = []
    for summary in reply.messages:
        parts = [p async for p in client.raw_message(user.user_id, summary.email_id)]
        found.append(b"".join(parts))
    return found


def parse_dsn(raw: bytes) -> tuple[Message, list[Message], str]:
    """The DSN, its per-recipient status groups, and its original-headers part."""
    dsn = email.message_from_bytes(raw)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = dsn.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    groups = parts[1].get_payload()
    assert isinstance(groups, list)
    headers = parts[2].get_payload(decode=True).decode()
    return dsn, groups[1:], headers


async def settled(js: JetStreamContext, peer: SmtpPeer | None = None, count: int = 0
                  ) -> None:
    await eventually(lambda: outbound_empty(js), "the outbound queue to empty")
    if peer is not None:
        await eventually(lambda: _at_least(peer, count), f"{count} message(s) at the peer")


async def _at_least(peer: SmtpPeer, count: int) -> bool:
    return len(peer.messages()) >= count


def routes(domain: str, peer: SmtpPeer) -> str:
    return f"{domain}={peer.addr}"


# delivering


async def test_remote_delivery_sends_the_blob_byte_exact_with_dot_stuffing(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers()
    await start_delivery(outbound_routes=routes("example.net", peer))
    body = ".leading dot\n..two dots\n.\nlast line without dot\n" + "x" * 900 + "\n"
    raw = make_message("byte exact", body=body)
    assert b"\r\n.\r\n" in raw and b"\r\n..two" in raw
    await queue_job(js, metadata_client, alice, raw, ["bob@example.net"], job_id="exact-1")
    await settled(js, peer, 1)
    [received] = peer.messages()
    assert received.data == raw
    assert received.meta["mail_from"] == SENDER
    assert received.rcpt_tos == ["bob@example.net"]
    assert received.meta["helo"] == "mx.example.test"
    assert received.meta["tls"] is False  # the peer offered no STARTTLS
    assert await inbox_raw(metadata_client, alice) == []


async def test_starttls_is_used_when_the_peer_offers_it(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(starttls=True)  # a self-signed certificate: opportunistic TLS
    await start_delivery(outbound_routes=routes("example.net", peer))
    raw = make_message("over tls")
    await queue_job(js, metadata_client, alice, raw, ["bob@example.net"], job_id="tls-1")
    await settled(js, peer, 1)
    [received] = peer.messages()
    assert received.meta["tls"] is True
    assert received.data == raw


@pytest.mark.parametrize(("policy", "starttls", "error"), [
    ("encrypt", False, "does not offer STARTTLS"),
    ("verify", True, "certificate verify failed"),  # self-signed: not good enough
])
async def test_required_tls_that_cannot_be_had_defers_the_job(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery, policy: str,
        starttls: bool, error: str) -> None:
    peer = smtp_peers(starttls=starttls)
    app = await start_delivery(outbound_routes=routes("example.net", peer),
                               outbound_tls=policy, outbound_retry_delay=3600.0)
    await queue_job(js, metadata_client, alice, make_message("secret"),
                    ["bob@example.net"], job_id="tls-required")
    [job] = await eventually(lambda: _deferred(app), "the job to be deferred")
    assert error in job.last_error
    assert peer.messages() == []


async def test_temporary_failures_are_retried_and_delivered_once(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"bob@example.net": ["rcpt:451", "data:451", "accept"]})
    await start_delivery(outbound_routes=routes("example.net", peer))
    await queue_job(js, metadata_client, alice, make_message("retry me"),
                    ["bob@example.net"], job_id="retry-1")
    await settled(js, peer, 1)
    assert len(peer.messages()) == 1
    assert await inbox_raw(metadata_client, alice) == []  # no DSN
    assert await dead_letters(js) == []


async def test_a_dropped_connection_is_retried(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"bob@example.net": ["drop:rcpt", "drop:data", "accept"]})
    await start_delivery(outbound_routes=routes("example.net", peer))
    raw = make_message("dropped")
    await queue_job(js, metadata_client, alice, raw, ["bob@example.net"], job_id="drop-1")
    await settled(js, peer, 1)
    assert [m.data for m in peer.messages()] == [raw]


async def test_permanent_failure_files_one_dsn_and_one_dead_letter(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"nobody@example.net": ["rcpt:550"]})
    await start_delivery(outbound_routes=routes("example.net", peer))
    job = await queue_job(js, metadata_client, alice, make_message("to nobody"),
                          ["nobody@example.net"], job_id="bounce-1")
    await settled(js)
    [letter] = await eventually(lambda: dead_letters(js), "the dead letter")
    dead_job = delivery_pb2.OutboundJob.FromString(letter.payload)
    assert dead_job.job_id == job.job_id and list(dead_job.rcpt_to) == ["nobody@example.net"]
    assert letter.blob_key == job.blob_key and "550 5.1.1" in letter.reason
    [raw] = await eventually(lambda: inbox_raw(metadata_client, alice), "the DSN")
    dsn, [group], headers = parse_dsn(raw)
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@example.test>"
    assert dsn["To"] == f"<{SENDER}>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert group["Final-Recipient"] == "rfc822; nobody@example.net"
    assert group["Action"] == "failed"
    assert group["Status"] == "5.1.1"
    assert group["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert "Subject: to nobody" in headers
    assert peer.messages() == []
    await asyncio.sleep(0.5)  # nothing more comes
    assert len(await inbox_raw(metadata_client, alice)) == 1


async def test_null_sender_gets_no_dsn_about_a_dsn(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"*": ["rcpt:550"]})
    await start_delivery(outbound_routes=routes("example.net", peer))
    await queue_job(js, metadata_client, alice, make_message("a bounce"),
                    ["nobody@example.net"], job_id="null-1", mail_from="")
    await settled(js)
    await eventually(lambda: dead_letters(js), "the dead letter")
    assert await inbox_raw(metadata_client, alice) == []


async def test_expired_job_returns_one_dsn(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"*": ["rcpt:451"]})
    await start_delivery(outbound_routes=routes("example.net", peer),
                         outbound_max_lifetime=2.0)
    await queue_job(js, metadata_client, alice, make_message("too late"),
                    ["late@example.net"], job_id="expire-1", age=1.0)
    await settled(js)
    [raw] = await eventually(lambda: inbox_raw(metadata_client, alice), "the DSN")
    _, [group], _ = parse_dsn(raw)
    assert group["Action"] == "failed"
    assert group["Status"] == "4.4.7"
    assert group["Diagnostic-Code"].startswith("smtp; 451 4.3.0")
    assert len(await dead_letters(js)) == 1
    assert len(await inbox_raw(metadata_client, alice)) == 1


async def test_delayed_notice_is_sent_once_while_retrying(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"*": ["rcpt:451", "rcpt:451", "rcpt:451", "accept"]})
    await start_delivery(outbound_routes=routes("example.net", peer),
                         outbound_delay_warning=0.5)
    await queue_job(js, metadata_client, alice, make_message("slowly"),
                    ["slow@example.net"], job_id="delay-1", age=1.0)
    await settled(js, peer, 1)
    [raw] = await inbox_raw(metadata_client, alice)
    dsn, [group], _ = parse_dsn(raw)
    assert group["Action"] == "delayed"
    assert "Will-Retry-Until" in group
    assert dsn["Subject"] == "Delayed Mail (still being retried)"


async def test_one_failing_recipient_of_two_affects_only_that_one(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"bad@example.net": ["rcpt:550"],
                                 "later@example.net": ["rcpt:451", "accept"]})
    await start_delivery(outbound_routes=routes("example.net", peer))
    raw = make_message("three recipients")
    await queue_job(js, metadata_client, alice, raw,
                    ["ok@example.net", "bad@example.net", "later@example.net"],
                    job_id="mixed-1")
    await settled(js, peer, 2)
    received = peer.messages()
    # ok got it at the first attempt and never again; later at the retry, alone.
    assert [m.rcpt_tos for m in received] == [["ok@example.net"], ["later@example.net"]]
    assert all(m.data == raw for m in received)
    [dsn_raw] = await inbox_raw(metadata_client, alice)
    _, groups, _ = parse_dsn(dsn_raw)
    assert [g["Final-Recipient"] for g in groups] == ["rfc822; bad@example.net"]
    [letter] = await dead_letters(js)
    assert list(delivery_pb2.OutboundJob.FromString(letter.payload).rcpt_to) == [
        "bad@example.net"]


# finding the mail exchanger


def _zone(*lines: str) -> str:
    return "\n".join(lines) + "\n"


async def test_mx_records_are_tried_in_preference_order(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, dns_peers: StartDnsPeer,
        start_delivery: StartDelivery) -> None:
    port = free_port()  # the same port on three loopback addresses
    primary = smtp_peers(host="127.0.0.2", port=port)
    backup = smtp_peers(host="127.0.0.3", port=port)
    dns_peer = dns_peers(_zone(
        "example.net. 60 IN MX 20 mx2.example.net.",
        "example.net. 60 IN MX 10 mx1.example.net.",
        "mx1.example.net. 60 IN A 127.0.0.2",
        "mx2.example.net. 60 IN A 127.0.0.3",
        # mx-down has no SMTP server: its backup takes the mail.
        "example.com. 60 IN MX 5 mx-down.example.com.",
        "example.com. 60 IN MX 50 mx2.example.net.",
        "mx-down.example.com. 60 IN A 127.0.0.5",
    ))
    await start_delivery(outbound_nameserver=dns_peer.addr, outbound_port=port)
    await queue_job(js, metadata_client, alice, make_message("to mx1"),
                    ["bob@example.net"], job_id="mx-1")
    await settled(js, primary, 1)
    assert len(backup.messages()) == 0
    await queue_job(js, metadata_client, alice, make_message("to the backup"),
                    ["carol@example.com"], job_id="mx-2")
    await settled(js, backup, 1)
    assert [m.rcpt_tos for m in backup.messages()] == [["carol@example.com"]]
    assert len(primary.messages()) == 1


async def test_domain_without_mx_falls_back_to_its_address_record(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, dns_peers: StartDnsPeer,
        start_delivery: StartDelivery) -> None:
    port = free_port()
    peer = smtp_peers(host="127.0.0.4", port=port)
    dns_peer = dns_peers(_zone("example.net. 60 IN A 127.0.0.4"))
    await start_delivery(outbound_nameserver=dns_peer.addr, outbound_port=port)
    await queue_job(js, metadata_client, alice, make_message("implicit mx"),
                    ["bob@example.net"], job_id="a-1")
    await settled(js, peer, 1)


@pytest.mark.parametrize(("zone", "status"), [
    ("example.net. 60 IN MX 0 .", "5.1.10"),  # RFC 7505 null MX
    ("other.example. 60 IN A 127.0.0.9", "5.1.2"),  # example.net does not exist
])
async def test_domain_that_takes_no_mail_is_a_permanent_failure(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        dns_peers: StartDnsPeer, start_delivery: StartDelivery, zone: str,
        status: str) -> None:
    dns_peer = dns_peers(_zone(zone))
    await start_delivery(outbound_nameserver=dns_peer.addr)
    await queue_job(js, metadata_client, alice, make_message("nowhere"),
                    ["bob@example.net"], job_id="nomail-1")
    await settled(js)
    [raw] = await eventually(lambda: inbox_raw(metadata_client, alice), "the DSN")
    _, [group], _ = parse_dsn(raw)
    assert group["Status"] == status
    assert group["Diagnostic-Code"].startswith("X-Mailgrid; ")


# DKIM


def _dkim_key() -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


async def test_dkim_signature_verifies_against_the_published_key(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        app_settings: Settings, smtp_peers: StartSmtpPeer, dns_peers: StartDnsPeer,
        start_delivery: StartDelivery) -> None:
    pem, public = _dkim_key()
    key_dir = app_settings.dkim_dir
    key_dir.mkdir(parents=True)
    (key_dir / "example.test.key").write_bytes(pem)
    record = f"v=DKIM1; k=rsa; p={public}"
    chunks = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    dns_peer = dns_peers(_zone(f"test1._domainkey.example.test. 60 IN TXT {chunks}"))
    peer = smtp_peers()
    await start_delivery(outbound_routes=routes("example.net", peer), dkim_selector="test1")
    raw = make_message("signed")
    await queue_job(js, metadata_client, alice, raw, ["bob@example.net"], job_id="dkim-1")
    await settled(js, peer, 1)
    [received] = peer.messages()
    assert received.data.startswith(b"DKIM-Signature: ")
    assert received.data.endswith(raw)
    signature = email.message_from_bytes(received.data)["DKIM-Signature"]
    assert "d=example.test" in signature and "s=test1" in signature

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = [dns_peer.host], dns_peer.port
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)  # type: ignore[attr-defined]

    assert await asyncio.to_thread(dkim.verify, received.data, dnsfunc=lookup)
    tampered = received.data.replace(b"Body of signed", b"Body of forged")
    assert not await asyncio.to_thread(dkim.verify, tampered, dnsfunc=lookup)


# queue operations


async def _queue(app: DeliveryApp, states: list[int] | None = None
                 ) -> list[delivery_pb2.QueuedJob]:
    async with channel(app.grpc_addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        reply = await call(stub.ListQueue(delivery_pb2.ListQueueRequest(states=states or [])))
    return list(reply.jobs)


async def _deferred(app: DeliveryApp) -> list[delivery_pb2.QueuedJob] | None:
    jobs = await _queue(app, [delivery_pb2.JOB_STATE_DEFERRED])
    return jobs or None


async def test_queue_lists_a_deferred_job_and_retry_delivers_it_now(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"*": ["rcpt:451"]})
    app = await start_delivery(outbound_routes=routes("example.net", peer),
                               outbound_retry_delay=3600.0, outbound_retry_max_delay=3600.0)
    await queue_job(js, metadata_client, alice, make_message("held"),
                    ["bob@example.net"], job_id="ops-1")
    [job] = await eventually(lambda: _deferred(app), "the job to be deferred")
    assert job.job.job_id == "ops-1" and list(job.job.rcpt_to) == ["bob@example.net"]
    assert job.attempts == 1
    assert job.last_error.startswith("451 4.3.0")
    assert job.next_attempt.seconds > time.time() + 3000
    peer.behave({"*": ["accept"]})
    async with channel(app.grpc_addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        retried = await call(stub.RetryJob(delivery_pb2.RetryJobRequest(job_id="ops-1")))
        assert retried.job.job.job_id.startswith("ops-1+r")
        await settled(js, peer, 1)
        with pytest.raises(NotFound):
            await call(stub.RetryJob(delivery_pb2.RetryJobRequest(job_id="ops-1")))
    assert await _queue(app) == []


async def test_dead_job_is_listed_requeued_by_retry_and_removed_by_drop(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"*": ["rcpt:550", "accept"]})
    app = await start_delivery(outbound_routes=routes("example.net", peer))
    for n in (1, 2):
        await queue_job(js, metadata_client, alice, make_message(f"dead {n}"),
                        [f"user{n}@example.net"], job_id=f"dead-{n}")
    await settled(js)
    dead = await eventually(lambda: _dead_jobs(app, 2), "two dead jobs")
    assert sorted(j.job.job_id for j in dead) == ["dead-1", "dead-2"]
    assert all("550 5.1.1" in j.last_error for j in dead)
    async with channel(app.grpc_addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        await call(stub.RetryJob(delivery_pb2.RetryJobRequest(job_id="dead-1")))
        await settled(js, peer, 1)
        dropped = await call(stub.DropJob(delivery_pb2.DropJobRequest(job_id="dead-2")))
        assert dropped.job.state == delivery_pb2.JOB_STATE_DEAD
    assert [m.rcpt_tos for m in peer.messages()] == [["user1@example.net"]]
    assert await _queue(app) == []


async def test_drop_removes_a_deferred_job(
        js: JetStreamContext, metadata_client: MetadataClient, alice: common_pb2.User,
        smtp_peers: StartSmtpPeer, start_delivery: StartDelivery) -> None:
    peer = smtp_peers(behaviour={"*": ["rcpt:451"]})
    app = await start_delivery(outbound_routes=routes("example.net", peer),
                               outbound_retry_delay=3600.0, outbound_retry_max_delay=3600.0)
    await queue_job(js, metadata_client, alice, make_message("unwanted"),
                    ["bob@example.net"], job_id="drop-me")
    await eventually(lambda: _deferred(app), "the job to be deferred")
    async with channel(app.grpc_addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        await call(stub.DropJob(delivery_pb2.DropJobRequest(job_id="drop-me")))
    await settled(js)
    assert await _queue(app) == []
    assert await inbox_raw(metadata_client, alice) == []


async def _dead_jobs(app: DeliveryApp, count: int) -> list[delivery_pb2.QueuedJob] | None:
    jobs = await _queue(app, [delivery_pb2.JOB_STATE_DEAD])
    return jobs if len(jobs) >= count else None
