"""search_svc as a process: the index, the EVENTS indexer and SearchService over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from nats.aio.client import Client as NATS

from mailgrid import bus
from mailgrid.clients import MetadataClient
from mailgrid.errors import InvalidArgument
from mailgrid.grpcutil import GrpcServer
from mailgrid.service import configure_logging, run_until_signalled
from mailgrid.settings import Settings
from mailgrid.v1 import search_pb2_grpc
from search_svc.indexer import Indexer
from search_svc.pacing import IndexPacer
from search_svc.ports import SearchIndex
from search_svc.service import SearchServicer

log = logging.getLogger(__name__)

SEARCH_SERVICE = "mailgrid.v1.SearchService"
EMBEDDED = "embedded://"


def index_path(settings: Settings) -> Path:
    """Where the embedded index lives: embedded:///PATH, or data_dir/search."""
    rest = settings.search_url.removeprefix(EMBEDDED)
    return Path(rest) if rest else settings.data_dir / "search"


async def open_index(settings: Settings) -> SearchIndex:
    """The SearchIndex ``settings.search_url`` names (embedded:// or meilisearch://)."""
    url = settings.search_url or EMBEDDED
    if url.startswith(EMBEDDED):
        from search_svc.index_tantivy import TantivyIndex

        return await TantivyIndex.open(index_path(settings))
    if url.startswith("meilisearch://"):
        from search_svc.index_meili import MeiliIndex

        return await MeiliIndex.open(url)
    raise InvalidArgument(f"unsupported search index URL {url!r}: expected embedded:// "
                          "or meilisearch://HOST:PORT/INDEX?key=KEY")


class SearchApp:
    """The search service. ``start`` returns once the indexer runs and gRPC is SERVING.

    One search_svc per index: the embedded index is a directory one process writes; with
    Meilisearch, run one indexer (more would apply a user's events out of order).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.grpc_addr = ""
        self.index: SearchIndex | None = None
        self.indexer: Indexer | None = None
        self._nc: NATS | None = None
        self._metadata: MetadataClient | None = None
        self._server: GrpcServer | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if not settings.nats_url:
            raise InvalidArgument("search_svc needs MAILGRID_NATS_URL")
        self.index = await open_index(settings)
        self._stop = asyncio.Event()
        self._nc = await bus.connect(settings.nats_url, "search_svc")
        js = self._nc.jetstream()
        await bus.ensure_streams(js, settings.nats_replicas)
        self._metadata = MetadataClient(settings.metadata_addr)
        self.indexer = Indexer(self.index, js, self._metadata, settings,
                               batch=settings.search_batch, linger=settings.search_linger,
                               pacer=IndexPacer(settings.search_index_max_delay))
        await self.indexer.subscribe()
        self._task = asyncio.create_task(self.indexer.run(self._stop), name="indexer")
        server = GrpcServer(settings.search_addr)
        server.add(search_pb2_grpc.add_SearchServiceServicer_to_server,
                   SearchServicer(self.index, self.indexer, self._metadata,
                                  settings.search_wait_timeout), SEARCH_SERVICE)
        self._server = server
        self.grpc_addr = await server.start()
        log.info("search_svc serving on %s (%s index at event %d)", self.grpc_addr,
                 self.index.backend, await self.index.applied_seq())

    async def stop(self) -> None:
        """Stops fetching (the batch in hand is applied), gRPC, NATS, then the index."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
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
        if self.index is not None:
            await self.index.close()
            self.index = None


async def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings, "search_svc")
    await run_until_signalled(SearchApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
