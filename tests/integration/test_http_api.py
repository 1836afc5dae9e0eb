"""The HTTP API over a real uvicorn port, a real metadata_svc and a real nats-server.

Mail is put into mailboxes the way the inbound worker does it (blob first, then
StoreDelivery), so these tests do not depend on delivery_svc.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.app import GatewayApp
from gateway.auth import TokenSigner
from mailgrid.clients import MetadataClient
from mailgrid.grpcutil import wait_healthy
from mailgrid.natsd import NatsServer, free_port
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, metadata_pb2
from metadata_svc.app import MetadataApp

PROBLEM = "application/problem+json"
ATTACHMENT = b"%PDF-1.4 not really a pdf \x00\xff\r\n"
_keys = itertools.count()


@dataclass
class Account:
    user_id: str
    address: str
    password: str
    headers: dict[str, str]


@pytest.fixture
async def gateway(settings: Settings, nats_url: str,
                  metadata: MetadataApp) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(settings.model_copy(update={
        "nats_url": nats_url, "metadata_addr": metadata.grpc_addr}))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def md(metadata: MetadataApp) -> AsyncIterator[MetadataClient]:
    async with MetadataClient(metadata.grpc_addr) as client:
        yield client


@pytest.fixture
async def http(gateway: GatewayApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.http_addr}") as client:
        yield client


async def login(http: httpx.AsyncClient, md: MetadataClient, address: str) -> Account:
    password = f"pw-{address}"
    user = await md.create_user(address, password)
    reply = await http.post("/v1/auth/token", json={"address": address, "password": password})
    assert reply.status_code == 200, reply.text
    token = reply.json()["access_token"]
    return Account(user.user_id, address, password, {"Authorization": f"Bearer {token}"})


@pytest.fixture
async def alice(http: httpx.AsyncClient, md: MetadataClient) -> Account:
    return await login(http, md, "alice@example.test")


@pytest.fixture
async def bob(http: httpx.AsyncClient, md: MetadataClient) -> Account:
    return await login(http, md, "bob@example.org")


def raw_message(subject: str) -> bytes:
    return (f"From: Carol <carol@example.net>\r\nTo: alice@example.test\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject}@example.net>\r\n\r\n"
            f"Body of {subject}.\r\n").encode()


async def deliver(md: MetadataClient, user: Account, subject: str, *,
                  with_attachment: bool = False, when: float | None = None) -> str:
    """Files a message as the inbound worker would; returns its email id."""
    raw = raw_message(subject)
    put = await md.put_blob(raw)
    parsed = metadata_pb2.ParsedMessage(
        message_id=f"{subject}@example.net", subject=subject, text=f"Body of {subject}.",
        preview=f"Body of {subject}.",
        to=[common_pb2.EmailAddress(email="alice@example.test")])
    sender = getattr(parsed, "from")
    sender.name, sender.email = "Carol", "carol@example.net"
    parsed.date.FromSeconds(int(when or time.time()))
    if with_attachment:
        blob = await md.put_blob(ATTACHMENT)
        parsed.attachments.append(common_pb2.Attachment(
            attachment_id="1", filename="Übersicht 2024.pdf", content_type="application/pdf",
            size=len(ATTACHMENT), blob_key=blob.blob_key))
    reply = await md.store_delivery(metadata_pb2.StoreDeliveryRequest(
        user_id=user.user_id, delivery_key=f"test-{next(_keys)}", blob_key=put.blob_key,
        size=len(raw), parsed=parsed))
    return reply.email_id


def assert_problem(reply: httpx.Response, status: int) -> dict[str, object]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body: dict[str, object] = reply.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    assert "Traceback" not in reply.text
    return body


async def folder_counts(http: httpx.AsyncClient, user: Account) -> dict[str, tuple[int, int]]:
    reply = await http.get("/v1/folders", headers=user.headers)
    assert reply.status_code == 200
    return {f["role"]: (f["total"], f["unread"]) for f in reply.json()["folders"]}


# ---- tokens --------------------------------------------------------------------------

async def test_a_token_is_issued_for_the_right_password(
        http: httpx.AsyncClient, md: MetadataClient, settings: Settings) -> None:
    user = await md.create_user("dave@example.test", "dave-password")
    reply = await http.post("/v1/auth/token",
                            json={"address": "dave@example.test", "password": "dave-password"})
    assert reply.status_code == 200
    body = reply.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == settings.token_ttl
    signer = TokenSigner(settings.token_secret, settings.token_ttl)
    assert signer.verify(body["access_token"]) == user.user_id


async def test_a_wrong_password_and_an_unknown_user_get_the_same_401(
        http: httpx.AsyncClient, alice: Account) -> None:
    wrong = await http.post("/v1/auth/token",
                            json={"address": alice.address, "password": "nope"})
    unknown = await http.post("/v1/auth/token",
                              json={"address": "nobody@example.test", "password": "nope"})
    assert assert_problem(wrong, 401) == assert_problem(unknown, 401)


async def test_no_token_gets_401_with_a_bearer_challenge(http: httpx.AsyncClient) -> None:
    reply = await http.get("/v1/folders")
    assert_problem(reply, 401)
    assert reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", [
    "Bearer not-a-token", "Basic YWxpY2U6cHc=", "Bearer", "bearer a.b.c",
])
async def test_a_bad_token_gets_401(http: httpx.AsyncClient, authorization: str) -> None:
    reply = await http.get("/v1/folders", headers={"Authorization": authorization})
    assert_problem(reply, 401)
    assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_an_expired_token_gets_401_invalid_token(
        http: httpx.AsyncClient, alice: Account, settings: Settings) -> None:
    signer = TokenSigner(settings.token_secret, settings.token_ttl)
    token = signer.issue(alice.user_id, now=time.time() - 2 * settings.token_ttl)
    reply = await http.get("/v1/folders", headers={"Authorization": f"Bearer {token}"})
    body = assert_problem(reply, 401)
    assert "expired" in str(body["detail"])
    assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# ---- reading -------------------------------------------------------------------------

async def test_folders_have_roles_and_counts(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    await deliver(md, alice, "one")
    reply = await http.get("/v1/folders", headers=alice.headers)
    assert reply.status_code == 200
    folders = reply.json()["folders"]
    roles = {f["role"] for f in folders}
    assert {"inbox", "sent", "drafts", "trash", "spam", "archive"} <= roles
    inbox = next(f for f in folders if f["role"] == "inbox")
    assert (inbox["total"], inbox["unread"]) == (1, 1)
    assert set(inbox) == {"id", "name", "role", "total", "unread"}


async def test_listing_pages_newest_first_and_filters_unread(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    start = time.time() - 100
    ids = [await deliver(md, alice, f"m{n}", when=start + n) for n in range(5)]
    seen: list[str] = []
    cursor: str | None = ""
    pages = 0
    while cursor is not None:
        reply = await http.get("/v1/folders/inbox/messages", headers=alice.headers,
                               params={"limit": 2, "cursor": cursor})
        assert reply.status_code == 200
        body = reply.json()
        seen += [m["id"] for m in body["messages"]]
        cursor = body["next_cursor"]
        pages += 1
    assert seen == ids[::-1]
    assert pages == 3

    for email_id in ids[:3]:
        reply = await http.patch(f"/v1/messages/{email_id}", headers=alice.headers,
                                 json={"is_read": True})
        assert reply.status_code == 200
    reply = await http.get("/v1/folders/inbox/messages", headers=alice.headers,
                           params={"unread": "true"})
    assert [m["id"] for m in reply.json()["messages"]] == ids[:2:-1]


async def test_a_listing_row_has_the_summary_fields(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    await deliver(md, alice, "fields", with_attachment=True, when=1_700_000_000)
    inbox_id = next(f["id"] for f in (await http.get(
        "/v1/folders", headers=alice.headers)).json()["folders"] if f["role"] == "inbox")
    reply = await http.get(f"/v1/folders/{inbox_id}/messages", headers=alice.headers)
    [row] = reply.json()["messages"]
    assert row["from"] == {"name": "Carol", "email": "carol@example.net"}
    assert row["subject"] == "fields"
    assert row["preview"] == "Body of fields."
    assert row["date"] == "2023-11-14T22:13:20Z"
    assert (row["is_read"], row["is_starred"], row["has_attachments"]) == (False, False, True)
    assert row["size"] == len(raw_message("fields"))


async def test_message_detail(http: httpx.AsyncClient, md: MetadataClient,
                              alice: Account) -> None:
    email_id = await deliver(md, alice, "detail", with_attachment=True)
    reply = await http.get(f"/v1/messages/{email_id}", headers=alice.headers)
    assert reply.status_code == 200
    body = reply.json()
    assert body["id"] == email_id
    assert body["message_id"] == "detail@example.net"
    assert body["from"]["email"] == "carol@example.net"
    assert body["to"] == [{"name": "", "email": "alice@example.test"}]
    assert body["text"] == "Body of detail."
    assert body["attachments"] == [{
        "id": "1", "filename": "Übersicht 2024.pdf", "content_type": "application/pdf",
        "size": len(ATTACHMENT), "inline": False, "content_id": ""}]
    assert {"folder_id", "thread_id", "cc", "subject", "date", "html", "is_read",
            "is_starred"} <= body.keys()


async def test_raw_bytes_are_identical_to_the_stored_message(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    email_id = await deliver(md, alice, "raw")
    reply = await http.get(f"/v1/messages/{email_id}/raw", headers=alice.headers)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "message/rfc822"
    assert reply.content == raw_message("raw")


async def test_an_attachment_downloads_with_safe_headers(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    email_id = await deliver(md, alice, "att", with_attachment=True)
    reply = await http.get(f"/v1/messages/{email_id}/attachments/1", headers=alice.headers)
    assert reply.status_code == 200
    assert reply.content == ATTACHMENT
    assert reply.headers["content-type"] == "application/pdf"
    assert reply.headers["content-disposition"] == (
        "attachment; filename=\"_bersicht 2024.pdf\"; "
        "filename*=UTF-8''%C3%9Cbersicht%202024.pdf")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["content-security-policy"] == "sandbox"
    missing = await http.get(f"/v1/messages/{email_id}/attachments/9", headers=alice.headers)
    assert_problem(missing, 404)


# ---- changing ------------------------------------------------------------------------

async def test_patch_sets_flags_and_moves_and_the_counts_follow(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    email_id = await deliver(md, alice, "patch")
    reply = await http.patch(f"/v1/messages/{email_id}", headers=alice.headers,
                             json={"is_read": True, "is_starred": True})
    assert reply.status_code == 200
    assert (reply.json()["is_read"], reply.json()["is_starred"]) == (True, True)
    assert (await folder_counts(http, alice))["inbox"] == (1, 0)

    reply = await http.patch(f"/v1/messages/{email_id}", headers=alice.headers,
                             json={"folder_id": "archive", "is_read": False})
    assert reply.status_code == 200
    counts = await folder_counts(http, alice)
    assert counts["inbox"] == (0, 0)
    assert counts["archive"] == (1, 1)
    assert reply.json()["folder_id"] == next(
        f["id"] for f in (await http.get("/v1/folders", headers=alice.headers)).json()[
            "folders"] if f["role"] == "archive")


@pytest.mark.parametrize("body", [
    {"is_read": "true"},            # a string is not a boolean here
    {"is_read": 1},
    {"flagged": True},              # unknown field
    {},                             # nothing to change
    [True],
])
async def test_patch_is_strict_and_answers_422_problems(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account, body: object) -> None:
    email_id = await deliver(md, alice, "strict")
    reply = await http.patch(f"/v1/messages/{email_id}", headers=alice.headers, json=body)
    problem = assert_problem(reply, 422)
    assert problem["errors"]


async def test_a_body_that_is_not_json_gets_400_problem(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    email_id = await deliver(md, alice, "badjson")
    reply = await http.patch(f"/v1/messages/{email_id}", content=b"{not json",
                             headers={**alice.headers, "Content-Type": "application/json"})
    assert_problem(reply, 400)


async def test_a_json_body_over_1_mib_gets_413_problem(
        http: httpx.AsyncClient, alice: Account) -> None:
    big = b'{"address": "' + b"a" * (1024 * 1024) + b'", "password": "x"}'
    reply = await http.post("/v1/auth/token", content=big,
                            headers={"Content-Type": "application/json"})
    assert_problem(reply, 413)


async def test_delete_moves_to_trash_then_deletes_for_good(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    email_id = await deliver(md, alice, "delete")
    first = await http.delete(f"/v1/messages/{email_id}", headers=alice.headers)
    assert (first.status_code, first.json()) == (200, {"permanent": False})
    counts = await folder_counts(http, alice)
    assert (counts["inbox"][0], counts["trash"][0]) == (0, 1)

    second = await http.delete(f"/v1/messages/{email_id}", headers=alice.headers)
    assert (second.status_code, second.json()) == (200, {"permanent": True})
    assert (await folder_counts(http, alice))["trash"][0] == 0
    assert_problem(await http.get(f"/v1/messages/{email_id}", headers=alice.headers), 404)


# ---- isolation -----------------------------------------------------------------------

async def test_another_users_message_is_404_everywhere(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account, bob: Account) -> None:
    email_id = await deliver(md, alice, "private", with_attachment=True)
    base = f"/v1/messages/{email_id}"
    replies = [
        await http.get(base, headers=bob.headers),
        await http.get(f"{base}/raw", headers=bob.headers),
        await http.get(f"{base}/attachments/1", headers=bob.headers),
        await http.patch(base, headers=bob.headers, json={"is_read": True}),
        await http.delete(base, headers=bob.headers),
        await http.delete(f"{base}?permanent=true", headers=bob.headers),
    ]
    bodies = [assert_problem(reply, 404) for reply in replies]
    assert all(body["detail"] == bodies[0]["detail"] for body in bodies)
    listing = await http.get("/v1/folders/inbox/messages", headers=bob.headers)
    assert listing.json() == {"messages": [], "next_cursor": None}
    # Alice's message is untouched.
    mine = await http.get(base, headers=alice.headers)
    assert mine.status_code == 200 and mine.json()["is_read"] is False


async def test_an_unknown_message_id_is_404(http: httpx.AsyncClient, alice: Account) -> None:
    for message_id in ("not-an-id", "4bd3ad5a-0b1c-11ef-8000-000000000000"):
        assert_problem(await http.get(f"/v1/messages/{message_id}", headers=alice.headers),
                       404)


# ---- the rest ------------------------------------------------------------------------

async def test_unknown_routes_and_methods_get_problems(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/v1/nothing-here"), 404)
    assert_problem(await http.put("/v1/auth/token"), 405)


async def test_openapi_lists_the_paths(http: httpx.AsyncClient) -> None:
    reply = await http.get("/openapi.json")
    assert reply.status_code == 200
    paths = reply.json()["paths"]
    assert {"/v1/auth/token", "/v1/folders", "/v1/folders/{folder_id}/messages",
            "/v1/messages/{message_id}", "/v1/messages/{message_id}/raw",
            "/v1/messages/{message_id}/attachments/{attachment_id}",
            "/healthz", "/readyz"} <= paths.keys()
    assert {"get", "patch", "delete"} <= paths["/v1/messages/{message_id}"].keys()


async def test_healthz_and_readyz_follow_nats(
        http: httpx.AsyncClient, nats_server: NatsServer, gateway: GatewayApp) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok", "checks": {}}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"metadata": True, "nats": True}

    await asyncio.to_thread(nats_server.stop)
    for _ in range(100):
        reply = await http.get("/readyz")
        if reply.status_code == 503:
            break
        await asyncio.sleep(0.05)
    body = assert_problem(reply, 503)
    assert body["checks"] == {"metadata": True, "nats": False}
    assert reply.headers["retry-after"]
    assert (await http.get("/healthz")).status_code == 200


async def test_metadata_down_gets_503_problem_with_retry_after(
        settings: Settings, nats_url: str) -> None:
    app = GatewayApp(settings.model_copy(update={
        "nats_url": nats_url, "metadata_addr": f"127.0.0.1:{free_port()}"}))
    await app.start()
    token = TokenSigner(settings.token_secret, settings.token_ttl).issue("some-user")
    try:
        async with httpx.AsyncClient(base_url=f"http://{app.http_addr}") as client:
            reply = await client.get("/v1/folders",
                                     headers={"Authorization": f"Bearer {token}"})
            assert_problem(reply, 503)
            assert reply.headers["retry-after"] == "5"
            ready = await client.get("/readyz")
            assert assert_problem(ready, 503)["checks"] == {"metadata": False, "nats": True}
    finally:
        await app.stop()


async def test_grpc_health_is_serving_while_the_gateway_runs(gateway: GatewayApp) -> None:
    await wait_healthy(gateway.grpc_addr, timeout=5)
