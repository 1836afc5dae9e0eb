"""The caller's sender allow/block lists, which steer the inbound spam rules.

    GET    /v1/sender-lists                 → {"entries": [{sender, allow, source}]}
    PUT    /v1/sender-lists/{sender}  {"allow": true}   → the lists after the change
    DELETE /v1/sender-lists/{sender}                    → the lists after the change

``sender`` is an address (``boss@example.net``) or a whole domain (``example.net``).
Moving a message into Spam adds its sender to the block list, moving it out of Spam to
the allow list (``source: "feedback"``); entries set here have ``source: "user"``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict

from gateway.http_api import User
from mailgrid.clients import MetadataClient
from mailgrid.v1 import common_pb2

Sender = Annotated[str, Path(min_length=1, max_length=320, pattern=r"^[^\s@]+(@[^\s@]+)?$")]


class SenderEntryOut(BaseModel):
    sender: str
    allow: bool
    source: str


class SenderLists(BaseModel):
    entries: list[SenderEntryOut]


class SenderEntryIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    allow: bool


def _lists(entries: list[common_pb2.SenderListEntry]) -> SenderLists:
    return SenderLists(entries=[SenderEntryOut(sender=e.sender, allow=e.allow,
                                               source=e.source) for e in entries])


def senders_router(metadata: MetadataClient) -> APIRouter:
    router = APIRouter(tags=["spam"], responses={
        400: {"description": "Not an address or a domain"},
        401: {"description": "Missing, invalid or expired token"},
    })

    @router.get("/sender-lists")
    async def get_lists(user: User) -> SenderLists:
        return _lists(await metadata.sender_lists(user))

    @router.put("/sender-lists/{sender}")
    async def put_entry(user: User, sender: Sender, body: SenderEntryIn) -> SenderLists:
        entry = common_pb2.SenderListEntry(sender=sender, allow=body.allow, source="user")
        return _lists(await metadata.update_sender_list(user, entry))

    @router.delete("/sender-lists/{sender}")
    async def delete_entry(user: User, sender: Sender) -> SenderLists:
        entry = common_pb2.SenderListEntry(sender=sender)
        return _lists(await metadata.update_sender_list(user, entry, remove=True))

    return router
