"""Scale-out: two instances of delivery_svc, search_svc, realtime_svc and the gateway
against one NATS, one metadata_svc and one Meilisearch index.

`mailgrid up` runs the first instance of each; the second ones are `mailgrid serve NAME`
processes given the suite's NATS and metadata addresses, as an operator would start them
on other machines. Mail comes in through both gateways' SMTP listeners; each message must
be stored once, indexed once and pushed once to each open session (one session on each
gateway). N is small here for CI time; MAILGRID_SCALE_N=1000 runs the issue's figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js import JetStreamContext

from mailgrid.natsd import free_port
from tests.contract.conftest import meilisearch_url, s3_server  # noqa: F401  (fixtures)
from tests.e2e.conftest import ROOT, LaunchSuite, Suite, is_serving, wait_for
from tests.e2e.live import WAIT, Live, bearer, message
from tests.e2e.mail import add_user, token
from tests.e2e.nats_cluster import nats_cluster

pytestmark = pytest.mark.e2e

N = int(os.environ.get("MAILGRID_SCALE_N", "200"))
RCPT = "scale@example.test"
# Messages sent while a NATS node is stopped (a third before, the rest after).
CLUSTER_N = int(os.environ.get("MAILGRID_CLUSTER_N", "60"))


@dataclass
class Served:
    """One `mailgrid serve NAME` process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9


@dataclass
class SecondInstances:
    env: dict[str, str]
    processes: dict[str, Served]

    @property
    def http_url(self) -> str:
        return f"http://{self.env['MAILGRID_HTTP_ADDR']}"

    @property
    def smtp(self) -> tuple[str, int]:
        host, _, port = self.env["MAILGRID_SMTP_ADDR"].rpartition(":")
        return host, int(port)


def _second_env(suite: Suite) -> dict[str, str]:
    """The suite's settings with its NATS and metadata_svc, and listeners of their own."""
    endpoints = suite.endpoints()
    env = dict(suite.env)
    env.update({
        "MAILGRID_NATS_URL": endpoints.nats_url,
        "MAILGRID_METADATA_ADDR": suite.grpc_addr("metadata"),
        "PYTHONUNBUFFERED": "1",
    })
    for name in ("delivery_addr", "realtime_addr", "search_addr", "gateway_grpc_addr",
                 "http_addr", "smtp_addr", "submission_addr"):
        env[f"MAILGRID_{name.upper()}"] = f"127.0.0.1:{free_port()}"
    return env


@contextlib.contextmanager
def second_instances(suite: Suite, base: Path) -> Iterator[SecondInstances]:
    env = _second_env(suite)
    started = SecondInstances(env, {})
    try:
        # The gateway last: it calls the others (as in services.SERVICES).
        for name, addr in (("delivery", "DELIVERY_ADDR"), ("realtime", "REALTIME_ADDR"),
                           ("search", "SEARCH_ADDR"), ("gateway", "GATEWAY_GRPC_ADDR")):
            log_path = base / f"{name}2.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "mailgrid", "serve", name], env=env, cwd=ROOT,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            served = started.processes[name] = Served(name, process, log_path)
            grpc_addr = env[f"MAILGRID_{addr}"]
            wait_for(lambda s=served, a=grpc_addr: _serving(s, a),  # type: ignore[misc]
                     f"second {name} serving on {grpc_addr}", 60, details=served.log)
        yield started
        for served in reversed(started.processes.values()):
            code = served.stop()
            assert code == 0, f"second {served.name} exited {code}\n{served.log()[-4000:]}"
    finally:
        for served in started.processes.values():
            if served.process.poll() is None:
                served.process.kill()
                served.process.wait()


def _serving(served: Served, addr: str) -> bool:
    if served.process.poll() is not None:
        pytest.fail(f"second {served.name} exited {served.process.returncode}:\n"
                    f"{served.log()[-4000:]}")
    return is_serving(addr)


def _send_many(host: str, port: int, subjects: list[str]) -> None:
    """One SMTP session per gateway, one transaction per message (RFC 5321 RSET-free:
    each MAIL starts a new transaction after the previous DATA)."""
    with smtplib.SMTP(host, port, timeout=60) as client:
        client.ehlo("peer.remote.test")
        for subject in subjects:
            client.mail("peer@remote.test")
            code, reply = client.rcpt(RCPT)
            assert code == 250, reply
            code, reply = client.data(message(RCPT, subject))
            assert code == 250, reply


async def _collect(session: Live, count: int) -> list[str]:
    """Subjects of the next ``count`` message_added events of a session."""
    subjects: list[str] = []
    while len(subjects) < count:
        event = await session.next()
        if event["type"] == "message_added":
            subjects.append(event["message"]["subject"])
        elif event["type"] not in ("ready", "heartbeat", "message_updated"):
            pytest.fail(f"unexpected event {event}")
    return subjects


def _search_total(base_url: str, auth: dict[str, str], query: str) -> tuple[int, list[str]]:
    subjects: list[str] = []
    cursor = ""
    total = 0
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while True:
            url = f"/v1/search?q={query}&limit=100" + (f"&cursor={cursor}" if cursor else "")
            reply = http.get(url, headers=auth)
            assert reply.status_code == 200, reply.text
            body: dict[str, Any] = reply.json()
            total = body["total_estimate"]
            subjects += [m["subject"] for m in body["messages"]]
            if not body["next_cursor"]:
                return total, subjects
            cursor = body["next_cursor"]


def _inbox_subjects(base_url: str, auth: dict[str, str]) -> list[str]:
    from tests.e2e.mail import all_messages

    with httpx.Client(base_url=base_url, timeout=30) as http:
        return [m["subject"] for m in all_messages(http, auth)]


async def test_two_of_each_service_store_index_and_push_every_message_once(
        launch_suite: LaunchSuite, meilisearch_url: str, s3_server: str,  # noqa: F811
        tmp_path: Path) -> None:
    host_part, _, query = meilisearch_url.partition("?")
    index_url = f"{host_part}/scale_{secrets.token_hex(4)}?{query}"
    # Backends by URL only: Meilisearch for the shared index, S3 (moto_server) for blobs.
    blob_url = f"s3://testing:testing@{s3_server}/scale-{secrets.token_hex(4)}?secure=false"
    suite = launch_suite(env={"MAILGRID_SEARCH_URL": index_url,
                              "MAILGRID_BLOB_URL": blob_url})
    await asyncio.to_thread(add_user, suite, RCPT)
    with second_instances(suite, tmp_path) as second:
        first_session = await Live.open(suite, await bearer(suite, RCPT))
        second_session = await Live.open(_as_suite(suite, second), await bearer(suite, RCPT))
        for session in (first_session, second_session):
            assert await session.until_ready() == []

        subjects = [f"scale message {i:05d}" for i in range(N)]
        senders = asyncio.gather(
            asyncio.to_thread(_send_many, *suite.smtp_host_port, subjects[0::2]),
            asyncio.to_thread(_send_many, *second.smtp, subjects[1::2]))
        pushed = await asyncio.wait_for(
            asyncio.gather(_collect(first_session, N), _collect(second_session, N), senders),
            timeout=WAIT + N * 0.5)
        for session_subjects in pushed[:2]:
            assert Counter(session_subjects) == Counter(subjects)  # pushed once per session

        auth = await asyncio.to_thread(_auth, suite)
        stored = await asyncio.to_thread(_inbox_subjects, second.http_url, auth)
        assert Counter(stored) == Counter(subjects)  # stored once
        assert "blobs s3://" in suite.log()
        raw = await asyncio.to_thread(_first_raw, second.http_url, auth)
        assert b"Subject: scale message" in raw  # read back from S3 through gateway 2

        last: list[int] = []

        def indexed() -> bool:
            last.append(_search_total(suite.http_url, auth, "scale")[0])
            return last[-1] == N

        await asyncio.to_thread(wait_for, indexed, f"{N} messages indexed", 60,
                                lambda: f"search found {last[-5:]}")
        for base_url in (suite.http_url, second.http_url):
            total, found = await asyncio.to_thread(_search_total, base_url, auth, "scale")
            assert total == N and Counter(found) == Counter(subjects)  # indexed once

        # Both delivery_svc instances took jobs from the one INBOUND work queue.
        assert "filed for 1 recipient" in second.processes["delivery"].log()
        assert "filed for 1 recipient" in suite.log()
        for session in (first_session, second_session):
            await session.close()


def _first_raw(base_url: str, auth: dict[str, str]) -> bytes:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        listing = http.get("/v1/folders/inbox/messages?limit=1", headers=auth).json()
        reply = http.get(f"/v1/messages/{listing['messages'][0]['id']}/raw", headers=auth)
        assert reply.status_code == 200, reply.text
        return reply.content


def _auth(suite: Suite) -> dict[str, str]:
    with httpx.Client(base_url=suite.http_url, timeout=30) as http:
        return token(http, RCPT)


def _as_suite(suite: Suite, second: SecondInstances) -> Suite:
    """The suite as seen through the second gateway (Live.open reads http_addr)."""
    return Suite(suite.base_dir, {**suite.env, "MAILGRID_HTTP_ADDR":
                                  second.env["MAILGRID_HTTP_ADDR"]},
                 suite.process, suite.stdout_path, suite.stderr_path, stopped=True)


def _send_retrying(host: str, port: int, subjects: list[str], halfway: threading.Event,
                   resume: threading.Event) -> dict[str, list[int]]:
    """Sends each message as a sending MTA would: a 4xx reply is retried (RFC 5321
    4.5.4.1). Sets ``halfway`` after a third of them and waits for ``resume``. Returns
    every reply code per subject."""
    replies: dict[str, list[int]] = {s: [] for s in subjects}
    for index, subject in enumerate(subjects):
        if index == len(subjects) // 3:
            halfway.set()
            assert resume.wait(60)
        for _ in range(30):
            try:
                with smtplib.SMTP(host, port, timeout=60) as client:
                    client.ehlo("peer.remote.test")
                    client.mail("peer@remote.test")
                    code, _ = client.rcpt(RCPT)
                    if code == 250:
                        code, _ = client.data(message(RCPT, subject))
            except smtplib.SMTPException:
                code = 421
            replies[subject].append(code)
            if code == 250:
                break
            time.sleep(0.5)
    return replies


async def test_a_nats_cluster_node_stopped_while_mail_flows_loses_nothing(
        launch_suite: LaunchSuite, tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "nats") as cluster:
        await cluster.wait_ready(replicas=3)
        suite = launch_suite(env={"MAILGRID_NATS_URL": cluster.url,
                                  "MAILGRID_NATS_REPLICAS": "3"})
        await asyncio.to_thread(add_user, suite, RCPT)
        subjects = [f"cluster message {i:04d}" for i in range(CLUSTER_N)]
        halfway, resume = threading.Event(), threading.Event()
        sending = asyncio.create_task(asyncio.to_thread(
            _send_retrying, *suite.smtp_host_port, subjects, halfway, resume))
        assert await asyncio.to_thread(halfway.wait, 60)
        # Stop the node most of the suite's connections are on: they must fail over.
        busiest = max(cluster.nodes, key=lambda node: node.client_count())
        assert busiest.client_count() > 0
        await asyncio.to_thread(busiest.stop)
        resume.set()
        replies = await sending

        accepted_after_stop = [s for s in subjects[CLUSTER_N // 3:] if replies[s][-1] == 250]
        assert accepted_after_stop == subjects[CLUSTER_N // 3:]  # SMTP kept accepting
        auth = await asyncio.to_thread(_auth, suite)
        stored: list[str] = []

        def all_stored() -> bool:
            stored[:] = _inbox_subjects(suite.http_url, auth)
            return set(stored) == set(subjects)

        await asyncio.to_thread(wait_for, all_stored, f"{CLUSTER_N} messages stored", 90,
                                lambda: f"{len(set(stored))} stored\n{cluster.logs()}")
        # Exactly once, except that a message answered 4xx and retried may have been
        # queued by the first try too (the sender cannot know; RFC 5321 6.1 prefers a
        # duplicate to a loss).
        retried = {s for s, codes in replies.items() if len(codes) > 1}
        print(f"stopped {busiest.name}; {len(retried)} of {CLUSTER_N} messages needed a "
              f"retry; stored {len(stored)}")
        duplicates = {s for s, count in Counter(stored).items() if count > 1}
        assert duplicates <= retried
        async with _jetstream(cluster.url) as js:
            info = await js.stream_info("INBOUND")
            assert info.config.num_replicas == 3


@contextlib.asynccontextmanager
async def _jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(url.split(","), connect_timeout=5)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()
