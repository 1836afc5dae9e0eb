"""Helpers of the send tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from mailgrid.clients import MetadataClient
from mailgrid.settings import Settings
from mailgrid.v1 import delivery_pb2
from metadata_svc.app import MetadataApp

PROBLEM = "application/problem+json"
MAX_SIZE = 256 * 1024
WAIT = 15.0


@dataclass
class Account:
    user_id: str
    address: str
    password: str
    headers: dict[str, str]


def gateway_settings(app_settings: Settings, metadata: MetadataApp,
                     delivery: DeliveryApp, **extra: Any) -> Settings:
    return app_settings.model_copy(update={
        "metadata_addr": metadata.grpc_addr, "delivery_addr": delivery.grpc_addr, **extra})


async def login(http: httpx.AsyncClient, md: MetadataClient, address: str) -> Account:
    password = f"pw-{address}"
    user = await md.create_user(address, password)
    reply = await http.post("/v1/auth/token", json={"address": address, "password": password})
    assert reply.status_code == 200, reply.text
    token = reply.json()["access_token"]
    return Account(user.user_id, address, password, {"Authorization": f"Bearer {token}"})


async def messages(http: httpx.AsyncClient, user: Account, folder: str) -> list[dict[str, Any]]:
    reply = await http.get(f"/v1/folders/{folder}/messages?limit=200", headers=user.headers)
    assert reply.status_code == 200, reply.text
    found: list[dict[str, Any]] = reply.json()["messages"]
    return found


async def wait_messages(http: httpx.AsyncClient, user: Account, folder: str,
                        count: int) -> list[dict[str, Any]]:
    """The folder's messages once it holds ``count`` of them (fails after WAIT seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        found = await messages(http, user, folder)
        if len(found) >= count:
            assert len(found) == count, found
            return found
        assert loop.time() < deadline, f"{user.address} {folder}: {len(found)} of {count}"
        await asyncio.sleep(0.05)


async def raw(http: httpx.AsyncClient, user: Account, email_id: str) -> bytes:
    reply = await http.get(f"/v1/messages/{email_id}/raw", headers=user.headers)
    assert reply.status_code == 200, reply.text
    return reply.content


async def detail(http: httpx.AsyncClient, user: Account, email_id: str) -> dict[str, Any]:
    reply = await http.get(f"/v1/messages/{email_id}", headers=user.headers)
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = reply.json()
    return found


async def settle(delivery: DeliveryApp, js: JetStreamContext) -> None:
    """Waits until the inbound workers have handled every INBOUND job."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while (await js.stream_info("INBOUND")).state.messages:
        assert loop.time() < deadline, "INBOUND jobs left unhandled"
        await asyncio.sleep(0.05)


async def outbound_jobs(js: JetStreamContext
                        ) -> list[tuple[str, dict[str, str], delivery_pb2.OutboundJob]]:
    """(subject, headers, job) of every message in the OUTBOUND stream."""
    info = await js.stream_info("OUTBOUND")
    found = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("OUTBOUND", seq)
            found.append((msg.subject or "", dict(msg.headers or {}),
                          delivery_pb2.OutboundJob.FromString(msg.data or b"")))
    return found


def assert_problem(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body: dict[str, Any] = reply.json()
    assert body["status"] == status
    assert "Traceback" not in reply.text
    return body
