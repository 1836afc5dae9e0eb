"""Client of search_svc's SearchService, raising mailgrid.errors instead of RPC errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mailgrid.grpcutil import call, channel, stream
from mailgrid.v1 import search_pb2, search_pb2_grpc


class SearchClient:
    def __init__(self, target: str, timeout: float = 30.0) -> None:
        self._channel: grpc.aio.Channel = channel(target)
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)
        # Covers the service's own wait for min_applied_seq.
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> SearchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def search(self, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        return await call(self._stub.Search(request, timeout=self.timeout))

    async def reindex(self, request: search_pb2.ReindexRequest
                      ) -> AsyncIterator[search_pb2.ReindexResponse]:
        """Progress of the rebuild (no deadline: a rebuild takes as long as it takes)."""
        async for progress in stream(self._stub.Reindex(request)):
            yield progress

    async def status(self) -> search_pb2.GetIndexStatusResponse:
        return await call(self._stub.GetIndexStatus(search_pb2.GetIndexStatusRequest(),
                                                     timeout=self.timeout))
