"""metadata_svc as a process: the store, the blob store, gRPC, events and blob GC."""

from __future__ import annotations

import asyncio
import logging

from mailgrid.grpcutil import GrpcServer, with_prebuilt_replies
from mailgrid.service import configure_logging, run_until_signalled
from mailgrid.settings import Settings
from mailgrid.v1 import metadata_pb2_grpc
from metadata_svc.backends import (
    blob_store_for,
    describe_blob_store,
    describe_metadata_store,
    open_metadata_store,
    prepare_blob_store,
)
from metadata_svc.events import OutboxPublisher
from metadata_svc.gc import BlobCollector
from metadata_svc.ports import MetadataStore
from metadata_svc.service import BlobServicer, MetadataServicer

log = logging.getLogger(__name__)

METADATA_SERVICE = "mailgrid.v1.MetadataService"
BLOB_SERVICE = "mailgrid.v1.BlobService"


async def open_store(settings: Settings) -> MetadataStore:
    """Opens the metadata store of ``settings`` directly, without the service running.

    For the CLI (``mailgrid user add`` while the suite is down): call ``create_user`` on
    the result, then ``close()``. SQLite allows one writer at a time across processes
    (busy_timeout waits for it), so this is also safe while the service runs; but the
    running service is the normal way in.
    """
    return await open_metadata_store(settings)


class MetadataApp:
    """The mailbox store service. ``start`` returns once gRPC is SERVING."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.grpc_addr = ""
        self._store: MetadataStore | None = None
        self.blobs = blob_store_for(settings)
        self._server: GrpcServer | None = None
        self._publisher: OutboxPublisher | None = None
        self.gc: BlobCollector | None = None

    @property
    def store(self) -> MetadataStore:
        if self._store is None:
            raise RuntimeError("MetadataApp is not started")
        return self._store

    async def start(self) -> None:
        settings = self.settings
        await prepare_blob_store(self.blobs)
        self._store = await open_store(settings)
        self._publisher = OutboxPublisher(self._store, settings.nats_url,
                                          nats_replicas=settings.nats_replicas)
        await self._publisher.start()
        self.gc = BlobCollector(self._store, self.blobs, settings.blob_gc_grace,
                                settings.blob_gc_interval)
        self.gc.start()
        server = GrpcServer(settings.metadata_addr)
        server.add(with_prebuilt_replies(
            metadata_pb2_grpc.add_MetadataServiceServicer_to_server, {"GetMessages"}),
            MetadataServicer(self._store, self.blobs, settings), METADATA_SERVICE)
        server.add(metadata_pb2_grpc.add_BlobServiceServicer_to_server,
                   BlobServicer(self.blobs), BLOB_SERVICE)
        self._server = server
        self.grpc_addr = await server.start()
        log.info("metadata_svc serving on %s (db %s, blobs %s)", self.grpc_addr,
                 describe_metadata_store(settings), describe_blob_store(self.blobs))

    async def collect_garbage(self) -> int:
        """Runs one blob GC sweep now (settings.blob_gc_grace applies); returns deletions."""
        if self.gc is None:
            raise RuntimeError("MetadataApp is not started")
        return await self.gc.collect_garbage()

    async def stop(self) -> None:
        """Health NOT_SERVING, stop gRPC (in-flight calls finish), publish, close."""
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self.gc is not None:
            await self.gc.stop()
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
        if self._store is not None:
            await self._store.close()
            self._store = None


async def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings, "metadata_svc")
    await run_until_signalled(MetadataApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
