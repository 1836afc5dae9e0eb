"""Fixtures of the send tests: metadata_svc, delivery_svc (inbound workers and
SubmitMessage; no outbound workers, so OUTBOUND jobs stay in the stream to be read) and
the gateway, all in-process on real sockets against the real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from gateway.app import GatewayApp
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.settings import Settings
from metadata_svc.app import MetadataApp
from tests.integration.send.kit import MAX_SIZE, Account, gateway_settings, login


@pytest.fixture
def app_settings(settings: Settings, nats_url: str) -> Settings:
    return settings.model_copy(update={
        "nats_url": nats_url, "outbound_workers": 0, "max_message_size": MAX_SIZE,
        "inbound_retry_delay": 0.2, "submission_auth_max_failures": 3,
    })


@pytest.fixture
async def delivery(app_settings: Settings, metadata: MetadataApp) -> AsyncIterator[DeliveryApp]:
    app = DeliveryApp(app_settings.model_copy(update={"metadata_addr": metadata.grpc_addr}))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def gateway(app_settings: Settings, metadata: MetadataApp,
                  delivery: DeliveryApp) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(gateway_settings(app_settings, metadata, delivery))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def http(gateway: GatewayApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.http_addr}", timeout=30) as client:
        yield client


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_url, "test-observer")
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def alice(http: httpx.AsyncClient, metadata_client: MetadataClient) -> Account:
    return await login(http, metadata_client, "alice@example.test")


@pytest.fixture
async def bob(http: httpx.AsyncClient, metadata_client: MetadataClient) -> Account:
    return await login(http, metadata_client, "bob@example.test")


@pytest.fixture
async def carol(http: httpx.AsyncClient, metadata_client: MetadataClient) -> Account:
    return await login(http, metadata_client, "carol@example.org")
