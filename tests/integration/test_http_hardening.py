"""HTTP hardening over real sockets: logout revokes (on every gateway, WebSocket
included), login throttling, harmless attachment names, strict JSON everywhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.app import GatewayApp
from mailgrid.clients import MetadataClient
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, metadata_pb2
from metadata_svc.app import MetadataApp
from realtime_svc.app import RealtimeApp
from tests.integration.test_http_api import ATTACHMENT, Account, assert_problem, login

MAX_FAILURES = 3
CLOSE_UNAUTHENTICATED = 4401


@pytest.fixture
async def realtime(app_settings: Settings) -> AsyncIterator[RealtimeApp]:
    app = RealtimeApp(app_settings)
    await app.start()
    yield app
    await app.stop()


def gateway_settings(settings: Settings, metadata: MetadataApp,
                     realtime: RealtimeApp) -> Settings:
    return settings.model_copy(update={
        "metadata_addr": metadata.grpc_addr, "realtime_addr": realtime.grpc_addr,
        "login_max_failures": MAX_FAILURES})


@pytest.fixture
async def gateway(app_settings: Settings, metadata: MetadataApp,
                  realtime: RealtimeApp) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(gateway_settings(app_settings, metadata, realtime))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def http(gateway: GatewayApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.http_addr}", timeout=30) as client:
        yield client


@pytest.fixture
async def md(metadata: MetadataApp) -> AsyncIterator[MetadataClient]:
    async with MetadataClient(metadata.grpc_addr) as client:
        yield client


@pytest.fixture
async def alice(http: httpx.AsyncClient, md: MetadataClient) -> Account:
    return await login(http, md, "alice@example.test")


# ---- logout --------------------------------------------------------------------------

async def test_logout_revokes_the_token_and_it_gets_401_from_then_on(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    assert (await http.get("/v1/folders", headers=alice.headers)).status_code == 200
    other = await login(http, md, "alice2@example.test")
    reply = await http.post("/v1/auth/logout", headers=alice.headers)
    assert reply.status_code == 204, reply.text
    body = assert_problem(await http.get("/v1/folders", headers=alice.headers), 401)
    assert "revoked" in str(body["detail"])
    assert_problem(await http.post("/v1/auth/logout", headers=alice.headers), 401)
    # Other tokens, and a new login of the same user, are unaffected.
    assert (await http.get("/v1/folders", headers=other.headers)).status_code == 200
    again = await http.post("/v1/auth/token",
                            json={"address": alice.address, "password": alice.password})
    token = again.json()["access_token"]
    fresh = await http.get("/v1/folders", headers={"Authorization": f"Bearer {token}"})
    assert fresh.status_code == 200


async def test_logout_without_a_token_is_401(http: httpx.AsyncClient) -> None:
    assert_problem(await http.post("/v1/auth/logout"), 401)


async def test_a_token_revoked_on_one_gateway_is_refused_by_another(
        app_settings: Settings, metadata: MetadataApp, realtime: RealtimeApp,
        http: httpx.AsyncClient, alice: Account) -> None:
    second = GatewayApp(gateway_settings(app_settings, metadata, realtime))
    await second.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{second.http_addr}") as other:
            assert (await other.get("/v1/folders", headers=alice.headers)).status_code == 200
            assert (await http.post("/v1/auth/logout", headers=alice.headers)).status_code \
                == 204
            for _ in range(200):  # the revocation travels through the NATS KV watch
                reply = await other.get("/v1/folders", headers=alice.headers)
                if reply.status_code == 401:
                    break
                await asyncio.sleep(0.02)
            assert_problem(reply, 401)
    finally:
        await second.stop()


async def test_logout_closes_the_websocket_of_that_token(
        gateway: GatewayApp, http: httpx.AsyncClient, alice: Account) -> None:
    url = f"ws://{gateway.http_addr}/v1/events"
    async with connect(url, additional_headers=alice.headers) as ws:
        await ws.send('{"type": "ping"}')
        assert (await http.post("/v1/auth/logout", headers=alice.headers)).status_code == 204
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CLOSE_UNAUTHENTICATED
    assert "revoked" in closed.value.rcvd.reason


# ---- login throttling ----------------------------------------------------------------

async def wrong_login(http: httpx.AsyncClient, address: str) -> httpx.Response:
    return await http.post("/v1/auth/token", json={"address": address, "password": "nope"})


async def test_failed_logins_for_one_address_get_429_with_retry_after_even_when_right(
        http: httpx.AsyncClient, alice: Account) -> None:
    for _ in range(MAX_FAILURES):
        assert_problem(await wrong_login(http, alice.address), 401)
    right = await http.post("/v1/auth/token",
                            json={"address": alice.address.upper(), "password": alice.password})
    assert_problem(right, 429)
    assert int(right.headers["retry-after"]) > 0


async def test_failed_logins_from_one_client_ip_get_429_for_any_address(
        http: httpx.AsyncClient) -> None:
    for n in range(MAX_FAILURES):
        assert_problem(await wrong_login(http, f"guess{n}@example.test"), 401)
    reply = await wrong_login(http, "someone-else@example.test")
    assert_problem(reply, 429)
    assert int(reply.headers["retry-after"]) > 0


# ---- attachment names ----------------------------------------------------------------

async def deliver_attachment(md: MetadataClient, user: Account, filename: str,
                             content_type: str) -> str:
    raw = b"Subject: att\r\n\r\nsee attachment\r\n"
    put = await md.put_blob(raw)
    blob = await md.put_blob(ATTACHMENT)
    parsed = metadata_pb2.ParsedMessage(subject="att", attachments=[common_pb2.Attachment(
        attachment_id="1", filename=filename, content_type=content_type,
        size=len(ATTACHMENT), blob_key=blob.blob_key)])
    reply = await md.store_delivery(metadata_pb2.StoreDeliveryRequest(
        user_id=user.user_id, delivery_key=f"att-{filename!r}", blob_key=put.blob_key,
        size=len(raw), parsed=parsed))
    return reply.email_id


HOSTILE_NAMES = [
    ("../../etc/passwd", "text/plain"),
    ("..\\..\\windows\\win.ini", "text/plain"),
    ("evil\x00.txt", "text/plain"),
    ("invoice\u202efdp.exe", "application/pdf"),     # shows as "invoiceexe.pdf"
    ("x" * 300 + ".pdf", "application/pdf"),
    ("page.html", "text/html"),
    ('quote".txt\r\nSet-Cookie: a=b', "text/plain"),
    ("", "text/html; charset=utf-8"),
    ("\u200b\u2028.", "image/svg+xml"),
]


async def test_attachments_download_as_attachments_with_harmless_names(
        http: httpx.AsyncClient, md: MetadataClient, alice: Account) -> None:
    # One test, many names: the mailbox setup is the slow part.
    for filename, content_type in HOSTILE_NAMES:
        await assert_served_harmlessly(http, md, alice, filename, content_type)


async def assert_served_harmlessly(http: httpx.AsyncClient, md: MetadataClient,
                                   alice: Account, filename: str, content_type: str) -> None:
    email_id = await deliver_attachment(md, alice, filename, content_type)
    reply = await http.get(f"/v1/messages/{email_id}/attachments/1", headers=alice.headers)
    assert reply.status_code == 200, reply.text
    assert reply.content == ATTACHMENT
    disposition = reply.headers["content-disposition"]
    assert disposition.startswith("attachment; filename=\"")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["content-security-policy"] == "sandbox"
    assert "set-cookie" not in reply.headers
    fallback = disposition.split('"')[1]
    assert fallback and "/" not in fallback and "\\" not in fallback and ".." not in fallback
    exact = disposition.split("filename*=UTF-8''")[1]
    assert "%00" not in exact and "%E2%80%AE" not in exact and "%2F" not in exact
    assert "%0D" not in exact and "%0A" not in exact
    assert len(fallback) <= 120 and disposition.isascii()


# ---- strict JSON ---------------------------------------------------------------------

BAD_LOGIN_BODIES: list[dict[str, object]] = [
    {"address": "a@example.test", "password": "x", "admin": True},   # unknown field
    {"address": ["a@example.test"], "password": "x"},                # wrong type
    {"address": "a@example.test"},                                   # missing field
    {"address": "a" * 400 + "@example.test", "password": "x"},       # too long
    {"address": "a@example.test", "password": 12345},                # number for string
]


async def test_a_login_body_off_the_schema_is_422_problem(http: httpx.AsyncClient) -> None:
    for body in BAD_LOGIN_BODIES:
        assert_problem(await http.post("/v1/auth/token", json=body), 422)


async def test_a_login_body_that_is_not_json_is_400_problem(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/auth/token", content=b'{"address": ',
                            headers={"content-type": "application/json"})
    assert_problem(reply, 400)
