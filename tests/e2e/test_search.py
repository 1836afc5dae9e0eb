"""Search end to end: mail in over SMTP, changes over HTTP, /v1/search out, `mailgrid up`.

Each search passes the EVENTS sequence of the change it follows as ``min_seq`` (read
from the stream as a live client would), so search_svc answers only once its index has
applied that change (read-your-writes), with no sleep and no polling of the index. How
fast that is belongs to the benchmark, not to these tests: the wait limit here is
generous so that a loaded CI machine cannot make them fail.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from email import policy
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from mailgrid import bus
from tests.e2e.conftest import Suite, running_suite
from tests.e2e.mail import PASSWORD, send

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def search_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("search-suite"),
                       env={"MAILGRID_SEARCH_WAIT_TIMEOUT": "30"}) as suite:
        yield suite


class Mailbox:
    """One user as a webmail client sees them: HTTP with a token, and their events."""

    def __init__(self, http: httpx.AsyncClient, auth: dict[str, str], address: str,
                 events: JetStreamContext.PushSubscription) -> None:
        self.http, self.auth, self.address, self.events = http, auth, address, events
        self.seq = 0

    async def next_event(self) -> int:
        """Waits for this user's next mailbox event; returns its stream sequence."""
        msg = await self.events.next_msg(timeout=30)
        self.seq = int(msg.metadata.sequence.stream)
        return self.seq

    async def search(self, q: str, **params: Any) -> dict[str, Any]:
        reply = await self.http.get("/v1/search", headers=self.auth,
                                    params={"q": q, "min_seq": self.seq, **params})
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    async def found(self, q: str) -> list[str]:
        return [m["id"] for m in (await self.search(q, limit=100))["messages"]]


@pytest.fixture
async def mailboxes(search_suite: Suite) -> AsyncIterator[Any]:
    nc = await bus.connect(search_suite.endpoints().nats_url, "e2e-search")
    js = nc.jetstream()
    http = httpx.AsyncClient(base_url=search_suite.http_url, timeout=30)

    async def open_mailbox(address: str) -> Mailbox:
        done = await asyncio.to_thread(search_suite.cli, "user", "add", address,
                                       "--password", PASSWORD)
        assert done.returncode == 0, done.stderr
        user_id = re.search(r"\(id ([0-9a-f-]+)\)", done.stdout)
        assert user_id is not None, done.stdout
        events = await js.subscribe(bus.events_subject(user_id.group(1)),
                                    ordered_consumer=True)
        token = await http.post("/v1/auth/token",
                                json={"address": address, "password": PASSWORD})
        assert token.status_code == 200, token.text
        auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
        return Mailbox(http, auth, address, events)

    yield open_mailbox
    await http.aclose()
    await nc.close()


def mail(to: str, subject: str, body: str, attachment: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Grace Hopper <grace@remote.test>"
    msg["To"], msg["Subject"] = to, subject
    msg.set_content(body)
    if attachment:
        msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf",
                           filename=attachment)
    return msg.as_bytes(policy=policy.SMTP)


async def receive(suite: Suite, box: Mailbox, subject: str, body: str,
                  attachment: str = "") -> str:
    """Sends over SMTP, waits for the mailbox event; returns the new message id."""
    code, _ = await asyncio.to_thread(send, suite, [box.address],
                                      mail(box.address, subject, body, attachment))
    assert code == 250
    await box.next_event()
    listing = await box.http.get("/v1/folders/inbox/messages", headers=box.auth)
    newest: str = listing.json()["messages"][0]["id"]
    return newest


async def test_mail_received_over_smtp_is_found_as_the_listing_shows_it(
        search_suite: Suite, mailboxes: Any) -> None:
    alice = await mailboxes("alice.search@example.test")
    email_id = await receive(search_suite, alice, "Q3 budget review",
                             "Please review the Zürich numbers before Friday.",
                             attachment="budget-q3.pdf")
    for q in ("budget", "zurich", "from:grace", "from:grace@remote.test",
              "to:alice.search", "subject:review", "filename:q3", "has:attachment",
              "is:unread", "in:inbox", '"zürich numbers"', "revi*",
              "newer_than:1d", "after:2000-01-01", "smaller:1M", "budget -lunch"):
        assert await alice.found(q) == [email_id], q
    for q in ("lunch", "from:alice", "is:starred", "in:archive", "larger:5M",
              "older_than:1d", "budget -zurich"):
        assert await alice.found(q) == [], q

    body = await alice.search("zurich")
    (hit,) = body["messages"]
    listing = await alice.http.get("/v1/folders/inbox/messages", headers=alice.auth)
    (row,) = listing.json()["messages"]
    assert {k: v for k, v in hit.items() if k != "snippet"} == row
    text = hit["snippet"]["text"]
    assert [text[s:e] for s, e in hit["snippet"]["highlights"]] == ["Zürich"]
    assert (body["total_estimate"], body["truncated"], body["next_cursor"]) == (1, False,
                                                                               None)


async def test_moved_flagged_and_deleted_messages_follow_in_search(
        search_suite: Suite, mailboxes: Any) -> None:
    box = await mailboxes("mover@example.test")
    email_id = await receive(search_suite, box, "travel plans", "flights to Lisbon")
    url = f"/v1/messages/{email_id}"

    assert (await box.http.patch(url, json={"is_starred": True, "is_read": True},
                                 headers=box.auth)).status_code == 200
    await box.next_event()
    assert await box.found("lisbon is:starred is:read") == [email_id]

    assert (await box.http.patch(url, json={"folder_id": "archive"},
                                 headers=box.auth)).status_code == 200
    await box.next_event()
    assert await box.found("lisbon in:archive") == [email_id]
    assert await box.found("lisbon in:inbox") == []

    assert (await box.http.delete(url, headers=box.auth)).json() == {"permanent": False}
    await box.next_event()
    assert await box.found("lisbon") == []              # Trash is left out, as in Gmail
    assert await box.found("lisbon in:trash") == [email_id]

    assert (await box.http.delete(url, headers=box.auth)).json() == {"permanent": True}
    await box.next_event()
    assert await box.found("lisbon in:anywhere") == []


async def test_a_user_never_finds_another_users_mail(
        search_suite: Suite, mailboxes: Any) -> None:
    owner = await mailboxes("owner@example.test")
    other = await mailboxes("other@example.test")
    await receive(search_suite, owner, "confidential merger", "project nightingale",
                  attachment="term-sheet.pdf")
    other.seq = owner.seq
    for q in ("nightingale", "confidential", "filename:term", "from:grace",
              "in:anywhere", "", "-nothing"):
        assert await other.found(q) == [], q
    assert len(await owner.found("nightingale")) == 1


async def test_pages_follow_the_cursor_newest_first(
        search_suite: Suite, mailboxes: Any) -> None:
    box = await mailboxes("pager@example.test")
    sent = [await receive(search_suite, box, f"report {n}", "weekly report")
            for n in range(5)]
    seen: list[str] = []
    cursor = ""
    while True:
        body = await box.search("weekly", limit=2, **({"cursor": cursor} if cursor else {}))
        assert body["total_estimate"] == 5
        seen += [m["id"] for m in body["messages"]]
        if not body["next_cursor"]:
            break
        cursor = body["next_cursor"]
    assert seen == list(reversed(sent))
    by_relevance = await box.search("weekly", order="relevance", limit=100)
    assert sorted(m["id"] for m in by_relevance["messages"]) == sorted(sent)


async def test_a_malformed_query_is_400_problem_with_its_position(
        search_suite: Suite, mailboxes: Any) -> None:
    box = await mailboxes("typo@example.test")
    for q, position in (('from:"bob', 5), ("(a OR b", 0), ("larger:lots", 7),
                        ("in:Nowhere", 3)):
        reply = await box.http.get("/v1/search", params={"q": q}, headers=box.auth)
        assert reply.status_code == 400, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json")
        problem = reply.json()
        assert problem["position"] == position, problem
        assert problem["type"] == "urn:mailgrid:problem:invalid-query"
    reply = await box.http.get("/v1/search", params={"cursor": "nonsense"},
                               headers=box.auth)
    assert reply.status_code == 400 and "position" not in reply.json()
    reply = await box.http.get("/v1/search", params={"q": "x"})
    assert reply.status_code == 401


async def test_reindex_rebuilds_a_users_index_with_progress(
        search_suite: Suite, mailboxes: Any) -> None:
    box = await mailboxes("rebuild@example.test")
    email_id = await receive(search_suite, box, "archive me", "old letters")
    done = await asyncio.to_thread(search_suite.cli, "reindex", "--user", box.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reindexed 1 message of 1 user"
    assert "rebuild@example.test" in done.stderr  # the progress line
    assert await box.found("letters") == [email_id]
    missing = await asyncio.to_thread(search_suite.cli, "reindex", "--user",
                                      "nobody@example.test")
    assert missing.returncode == 1 and missing.stderr.startswith("mailgrid: ")
