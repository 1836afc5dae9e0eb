"""GET /v1/search: Gmail-style search over the caller's mailbox, through search_svc.

    GET /v1/search?q=from:alice has:attachment&limit=20&cursor=...&order=newest

answers ``{messages: [summary + snippet], next_cursor, total_estimate, truncated}``;
the summaries are those of the folder listing, each with a ``snippet``: ``text`` and
``highlights`` (``[start, end]`` code point spans of text that matched). A malformed
query is 400 problem+json with the ``position`` (0-based, in code points) of the error.
``min_seq`` asks for read-your-writes: the answer waits until the index has applied
that event sequence (the ``cursor`` of an event from /v1/events), 503 if it cannot.
Trash and Spam are searched only when the query names a folder (in:trash,
in:anywhere), as in Gmail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from gateway import problems
from gateway.http_api import SummaryOut, User, summary_out
from mailgrid.errors import InvalidArgument
from mailgrid.search_client import SearchClient
from mailgrid.v1 import search_pb2

# The detail of a malformed query ends with this (search_svc.query.QuerySyntaxError).
_POSITION = re.compile(r" at position (\d+)$")
_ORDERS = {"newest": search_pb2.SEARCH_ORDER_NEWEST,
           "relevance": search_pb2.SEARCH_ORDER_RELEVANCE}


class SnippetOut(BaseModel):
    text: str
    highlights: list[tuple[int, int]]


class SearchHitOut(SummaryOut):
    snippet: SnippetOut


class SearchResults(BaseModel):
    messages: list[SearchHitOut]
    next_cursor: str | None
    total_estimate: int
    # More messages may match than total_estimate says (the backend stopped counting).
    truncated: bool


@dataclass(frozen=True)
class SearchDeps:
    search: SearchClient


def hit_out(result: search_pb2.SearchResult) -> SearchHitOut:
    summary = summary_out(result.message).model_dump(by_alias=True)
    snippet = {"text": result.snippet.text,
               "highlights": [(h.start, h.end) for h in result.snippet.highlights]}
    return SearchHitOut.model_validate({**summary, "snippet": snippet})


def query_problem(err: InvalidArgument) -> problems.ProblemResponse:
    """400 for a query or cursor search_svc refused, with the position when it has one."""
    match = _POSITION.search(err.detail)
    extra: dict[str, Any] = {"position": int(match.group(1))} if match else {}
    kind = "invalid-query" if match else "invalid-request"
    return problems.problem(400, err.detail, kind=kind, title="Invalid query", **extra)


def search_routes(deps: SearchDeps) -> APIRouter:
    router = APIRouter(tags=["search"], responses={
        400: {"description": "Malformed query (with its position) or cursor"},
        401: {"description": "Missing, invalid or expired token"},
        503: {"description": "search_svc is down, or min_seq was not reached in time"},
    })

    @router.get("/search", response_model=SearchResults)
    async def search(
        user: User,
        q: Annotated[str, Query(max_length=2000)] = "",
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str, Query(max_length=1000)] = "",
        order: Literal["newest", "relevance"] = "newest",
        min_seq: Annotated[int, Query(ge=0)] = 0,
    ) -> Any:
        """Messages matching ``q`` (Gmail operators), newest first or by relevance; pass
        ``next_cursor`` back as ``cursor`` (same q and order) for the next page."""
        request = search_pb2.SearchRequest(user_id=user, query=q, page_size=limit,
                                           page_token=cursor, order=_ORDERS[order],
                                           min_applied_seq=min_seq)
        try:
            reply = await deps.search.search(request)
        except InvalidArgument as err:
            return query_problem(err)
        return SearchResults(messages=[hit_out(r) for r in reply.results],
                             next_cursor=reply.next_page_token or None,
                             total_estimate=reply.total_estimate,
                             truncated=reply.truncated)

    return router
