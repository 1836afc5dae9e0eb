"""Services started in-process on real sockets, against the real nats-server fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mailgrid.clients import MetadataClient
from mailgrid.settings import Settings
from metadata_svc.app import MetadataApp


@pytest.fixture
def app_settings(settings: Settings, nats_url: str) -> Settings:
    """Test settings wired to the test's nats-server (modules may override this)."""
    return settings.model_copy(update={"nats_url": nats_url})


@pytest.fixture
async def metadata(app_settings: Settings) -> AsyncIterator[MetadataApp]:
    """metadata_svc serving on a free loopback port."""
    app = MetadataApp(app_settings)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def metadata_client(metadata: MetadataApp) -> AsyncIterator[MetadataClient]:
    async with MetadataClient(metadata.grpc_addr) as client:
        yield client
