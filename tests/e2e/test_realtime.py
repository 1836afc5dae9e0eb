"""Live events through the whole suite: SMTP in, WebSocket (or long poll) out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from gateway.auth import TokenSigner
from tests.e2e.conftest import Suite
from tests.e2e.live import WAIT, Live, bearer, deliver, subjects, ws_url
from tests.e2e.mail import add_user

pytestmark = pytest.mark.e2e


async def user(suite: Suite, address: str) -> str:
    await asyncio.to_thread(add_user, suite, address)
    return await bearer(suite, address)


async def test_an_smtp_delivery_reaches_both_open_sessions_of_the_recipient_only(
        shared_suite: Suite) -> None:
    alice = await user(shared_suite, "live-alice@example.test")
    bob = await user(shared_suite, "live-bob@example.test")
    laptop = await Live.open(shared_suite, alice)
    phone = await Live.open(shared_suite, alice, header_auth=False)
    bobs = await Live.open(shared_suite, bob)
    for session in (laptop, phone, bobs):
        assert await session.until_ready() == []

    await deliver(shared_suite, "live-alice@example.test", "for alice")
    for session in (laptop, phone):
        (event,) = await session.events(1)
        assert event["type"] == "message_added"
        assert event["message"]["subject"] == "for alice"
        assert event["message"]["from"] == {"name": "", "email": "peer@remote.test"}
        inbox = next(f for f in event["folders"] if f["role"] == "inbox")
        assert (inbox["total"], inbox["unread"]) == (1, 1)
        assert event["cursor"].isdigit()
    # Bob's first event is his own message: alice's never reached him.
    await deliver(shared_suite, "live-bob@example.test", "for bob")
    assert subjects(await bobs.events(1)) == ["for bob"]
    for session in (laptop, phone, bobs):
        await session.close()


async def test_a_client_back_with_its_cursor_gets_exactly_the_three_it_missed(
        shared_suite: Suite) -> None:
    rcpt = "live-carol@example.test"
    token = await user(shared_suite, rcpt)
    session = await Live.open(shared_suite, token)
    await session.until_ready()
    await deliver(shared_suite, rcpt, "seen")
    assert subjects(await session.events(1)) == ["seen"]
    cursor = session.cursor
    await session.close()

    for i in range(3):
        await deliver(shared_suite, rcpt, f"missed {i}")
    # The three are filed (the cursor then resumes before them, whatever the timing).
    async with httpx.AsyncClient(base_url=shared_suite.http_url, timeout=30) as http:
        await wait_inbox_total(http, token, 4)

    back = await Live.open(shared_suite, token, since=cursor)
    caught_up = await back.until_ready()
    # Concurrent workers may file queued messages in any order; the events follow it.
    assert sorted(subjects(caught_up)) == ["missed 0", "missed 1", "missed 2"]
    await deliver(shared_suite, rcpt, "live again")
    assert subjects(await back.events(1)) == ["live again"]  # nothing repeated before it
    await back.close()

    # The long poll answers the same events for the same cursor.
    async with httpx.AsyncClient(base_url=shared_suite.http_url, timeout=30) as http:
        polled = await poll(http, token, cursor, timeout=0)
    assert polled["events"][:3] == caught_up
    assert subjects(polled["events"]) == [*subjects(caught_up), "live again"]
    assert polled["cursor"] == polled["events"][-1]["cursor"]


async def wait_inbox_total(http: httpx.AsyncClient, token: str, total: int) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        reply = await http.get("/v1/folders", headers={"Authorization": f"Bearer {token}"})
        inbox = next(f for f in reply.json()["folders"] if f["role"] == "inbox")
        if inbox["total"] >= total:
            return
        assert time.monotonic() < deadline, f"inbox never reached {total}"
        await asyncio.sleep(0.05)


async def poll(http: httpx.AsyncClient, token: str, since: str | None,
               timeout: float) -> dict[str, Any]:
    params = {"timeout": str(timeout), **({"since": since} if since else {})}
    reply = await http.get("/v1/events/poll", params=params,
                           headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def test_flags_move_and_delete_over_http_are_pushed(shared_suite: Suite) -> None:
    rcpt = "live-dave@example.test"
    token = await user(shared_suite, rcpt)
    session = await Live.open(shared_suite, token)
    await session.until_ready()
    await deliver(shared_suite, rcpt, "to organise")
    (added,) = await session.events(1)
    email_id = added["message"]["id"]
    inbox_id = added["message"]["folder_id"]
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=shared_suite.http_url, timeout=30) as http:
        reply = await http.patch(f"/v1/messages/{email_id}", json={"is_read": True},
                                 headers=auth)
        assert reply.status_code == 200, reply.text
        (read,) = await session.events(1)
        assert read["type"] == "message_updated" and read["message"]["is_read"] is True
        assert next(f for f in read["folders"] if f["role"] == "inbox")["unread"] == 0

        reply = await http.patch(f"/v1/messages/{email_id}", json={"folder_id": "archive"},
                                 headers=auth)
        assert reply.status_code == 200, reply.text
        (moved,) = await session.events(1)
        assert moved["type"] == "message_updated"
        assert moved["previous_folder_id"] == inbox_id
        assert {f["role"] for f in moved["folders"]} >= {"inbox", "archive"}

        reply = await http.delete(f"/v1/messages/{email_id}?permanent=true", headers=auth)
        assert reply.status_code == 200, reply.text
        (deleted,) = await session.events(1)
        assert deleted["type"] == "message_deleted"
        assert (deleted["email_id"], deleted["permanent"]) == (email_id, True)

        # Without a cursor the long poll waits for new events only, and says where it is.
        quiet = await poll(http, token, None, timeout=0)
        assert quiet["events"] == [] and quiet["cursor"].isdigit()
    await session.close()


async def test_a_bad_or_missing_token_closes_with_4401(shared_suite: Suite) -> None:
    bad = await Live.open(shared_suite, "not-a-token")
    assert await bad.close_code() == 4401
    silent = await connect(ws_url(shared_suite), open_timeout=WAIT)
    await silent.send("hello")  # not {"token": ...}
    assert await Live(silent).close_code() == 4401
    async with httpx.AsyncClient(base_url=shared_suite.http_url, timeout=30) as http:
        reply = await http.get("/v1/events/poll", params={"timeout": "0"})
    assert reply.status_code == 401
    assert reply.headers["content-type"].startswith("application/problem+json")


async def test_a_foreign_origin_is_refused_and_our_own_accepted(shared_suite: Suite) -> None:
    token = await user(shared_suite, "live-erin@example.test")
    headers = {"Authorization": f"Bearer {token}"}
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url(shared_suite), additional_headers=headers,
                      origin=Origin("https://evil.example"), open_timeout=WAIT)
    assert refused.value.response.status_code == 403
    ours = await connect(ws_url(shared_suite), additional_headers=headers,
                         origin=Origin(f"http://{shared_suite.http_addr}"), open_timeout=WAIT)
    assert await Live(ours).until_ready() == []
    await ours.close()


async def test_a_cursor_ahead_of_the_stream_gets_a_resync_and_a_4409_close(
        shared_suite: Suite) -> None:
    token = await user(shared_suite, "live-frank@example.test")
    session = await Live.open(shared_suite, token, since="99999999999")
    resync = await session.next()
    assert resync["type"] == "resync" and resync["reason"] == "cursor_unknown"
    assert resync["cursor"].isdigit()
    assert await session.close_code() == 4409
    bad = await Live.open(shared_suite, token, since="yesterday")
    assert await bad.close_code() == 4400


async def test_the_stream_ends_when_the_token_expires(shared_suite: Suite) -> None:
    token = await user(shared_suite, "live-grace@example.test")
    secret = (shared_suite.data_dir / "secrets" / "token_secret").read_text().strip()
    user_id = jwt.decode(token, options={"verify_signature": False})["sub"]
    short = TokenSigner(secret=secret, ttl=2).issue(user_id)
    session = await Live.open(shared_suite, short)
    assert await session.until_ready() == []
    assert await session.close_code() == 4401
