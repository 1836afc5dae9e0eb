"""delivery_svc as a process: inbound workers on the bus, DeliveryService over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS

from delivery_svc import outbound
from delivery_svc.inbound import InboundWorker, ensure_consumer
from delivery_svc.service import DeliveryServicer
from delivery_svc.submit import Submitter
from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import InvalidArgument
from mailgrid.grpcutil import GrpcServer
from mailgrid.service import configure_logging, run_until_signalled
from mailgrid.settings import Settings
from mailgrid.v1 import delivery_pb2_grpc

log = logging.getLogger(__name__)

DELIVERY_SERVICE = "mailgrid.v1.DeliveryService"


class DeliveryApp:
    """The delivery service. ``start`` returns once workers run and gRPC is SERVING.

    Any number of instances may run against one NATS: their workers share the durable
    consumer, so each job is handled by one of them.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.grpc_addr = ""
        self._nc: NATS | None = None
        self._metadata: MetadataClient | None = None
        self._server: GrpcServer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        if not settings.nats_url:
            raise InvalidArgument("delivery_svc needs MAILGRID_NATS_URL")
        self._stop = asyncio.Event()
        self._nc = await bus.connect(settings.nats_url, "delivery_svc")
        js = self._nc.jetstream()
        await bus.ensure_streams(js, settings.nats_replicas)
        await ensure_consumer(js, settings)
        self._metadata = MetadataClient(settings.metadata_addr)
        workers = [InboundWorker(settings, js, self._metadata, name=f"inbound-{i}")
                   for i in range(max(1, settings.inbound_workers))]
        for worker in workers:
            await worker.subscribe()
        self._tasks = [asyncio.create_task(w.run(self._stop), name=w.name) for w in workers]
        self._tasks += await outbound.start_workers(settings, js, self._metadata, self._stop)
        server = GrpcServer(settings.delivery_addr)
        server.add(delivery_pb2_grpc.add_DeliveryServiceServicer_to_server,
                   DeliveryServicer(js, Submitter(settings, js, self._metadata)),
                   DELIVERY_SERVICE)
        self._server = server
        self.grpc_addr = await server.start()
        log.info("delivery_svc serving on %s with %d inbound workers (metadata %s)",
                 self.grpc_addr, len(workers), settings.metadata_addr)

    async def stop(self) -> None:
        """Stops fetching, lets each worker finish its job in hand, then drains NATS."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None
        if self._metadata is not None:
            await self._metadata.close()
            self._metadata = None


async def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings, "delivery_svc")
    await run_until_signalled(DeliveryApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
