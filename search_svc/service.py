"""The gRPC servicer of search_svc: Search, Reindex and GetIndexStatus.

Search parses the query (a malformed one is INVALID_ARGUMENT "... at position N"),
resolves in:FOLDER against the user's folders, leaves Trash and Spam out unless the query
names a folder (as Gmail does; in:anywhere searches everything), waits for the index to
reach ``min_applied_seq`` when asked, and returns one page.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mailgrid.clients import MetadataClient
from mailgrid.errors import InvalidArgument, Unavailable
from mailgrid.grpcutil import rpc, rpc_stream
from mailgrid.v1 import common_pb2, search_pb2, search_pb2_grpc
from search_svc import query
from search_svc.indexer import Indexer
from search_svc.ports import Order, SearchIndex
from search_svc.reindex import Reindexer

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

ROLES = {
    "inbox": common_pb2.FOLDER_ROLE_INBOX, "sent": common_pb2.FOLDER_ROLE_SENT,
    "drafts": common_pb2.FOLDER_ROLE_DRAFTS, "trash": common_pb2.FOLDER_ROLE_TRASH,
    "spam": common_pb2.FOLDER_ROLE_SPAM, "archive": common_pb2.FOLDER_ROLE_ARCHIVE,
}
# Left out of a search that names no folder.
HIDDEN_ROLES = (common_pb2.FOLDER_ROLE_TRASH, common_pb2.FOLDER_ROLE_SPAM)


def resolve_folders(node: query.Node, folders: list[common_pb2.Folder]) -> query.Node:
    """The tree with each in:NAME resolved to folder ids (role name, folder name in any
    case, or folder id), and Trash and Spam left out if no folder is named.
    An unknown folder is a QuerySyntaxError at its position."""
    def resolve(node: query.In) -> query.Node:
        name = node.name.casefold()
        if name == query.ANYWHERE:
            return query.All()
        ids = tuple(f.folder_id for f in folders
                    if (name in ROLES and f.role == ROLES[name])
                    or f.name.casefold() == name or f.folder_id == node.name)
        if not ids:
            raise query.QuerySyntaxError(f"no folder named {node.name!r}", node.pos)
        return query.with_folders(node, ids)

    if query.mentions_folder(node):
        return query.map_in(node, resolve)
    hidden = tuple(f.folder_id for f in folders if f.role in HIDDEN_ROLES)
    if not hidden:
        return node
    visible = query.Not(query.In("trash+spam", folder_ids=hidden))
    if isinstance(node, query.All):
        return visible
    return query.And((node, visible))


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """mailgrid.v1.SearchService over a SearchIndex kept in step by an Indexer."""

    def __init__(self, index: SearchIndex, indexer: Indexer, metadata: MetadataClient,
                 wait_timeout: float) -> None:
        self.index = index
        self.indexer = indexer
        self.metadata = metadata
        self.wait_timeout = wait_timeout

    @rpc
    async def Search(self, request: search_pb2.SearchRequest,
                     context: Context) -> search_pb2.SearchResponse:
        if not request.user_id:
            raise InvalidArgument("user_id is required")
        order = (Order.RELEVANCE if request.order == search_pb2.SEARCH_ORDER_RELEVANCE
                 else Order.NEWEST)
        node = query.parse(request.query)
        if request.min_applied_seq:
            applied = await self.indexer.wait_applied(request.min_applied_seq,
                                                      self.wait_timeout)
            if applied < request.min_applied_seq:
                raise Unavailable(f"the index has applied events up to {applied}, not "
                                  f"yet {request.min_applied_seq}")
        folders = await self.metadata.list_folders(request.user_id)
        node = resolve_folders(node, folders)
        page = await self.index.search(request.user_id, node, order=order,
                                       page_size=request.page_size,
                                       page_token=request.page_token)
        return search_pb2.SearchResponse(
            results=[search_pb2.SearchResult(
                message=hit.summary,
                snippet=search_pb2.Snippet(text=hit.snippet, highlights=[
                    search_pb2.Highlight(start=h.start, end=h.end) for h in hit.highlights]))
                for hit in page.hits],
            next_page_token=page.next_page_token, total_estimate=page.total_estimate,
            truncated=page.truncated, applied_seq=page.applied_seq)

    @rpc_stream
    async def Reindex(self, request: search_pb2.ReindexRequest,
                      context: Context) -> AsyncIterator[search_pb2.ReindexResponse]:
        reindexer = Reindexer(self.index, self.indexer, self.metadata)
        async for progress in reindexer.run(user_id=request.user_id,
                                            address=request.address):
            yield progress

    @rpc
    async def GetIndexStatus(self, request: search_pb2.GetIndexStatusRequest,
                             context: Context) -> search_pb2.GetIndexStatusResponse:
        status = await self.index.status()
        return search_pb2.GetIndexStatusResponse(
            applied_seq=status.applied_seq, backend=status.backend,
            documents=status.documents)
