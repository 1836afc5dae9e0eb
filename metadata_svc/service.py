"""The gRPC servicers of metadata_svc: MetadataService and BlobService.

They only translate: check the request, call the store or the blob store, build the
reply. Errors are mailgrid.errors, turned into status codes by @rpc / @rpc_stream.
Another user's message, raw bytes or attachment is NOT_FOUND, exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from mailgrid import wire
from mailgrid.errors import InvalidArgument, MailgridError, NotFound
from mailgrid.filing import fill_bodies
from mailgrid.grpcutil import CHUNK_SIZE, rpc, rpc_stream
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc
from metadata_svc.ports import BlobRef, BlobStore, MetadataStore

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
# Messages one GetMessages call may ask for, and the size its reply keeps under (the
# clients' gRPC limit is 16 MiB).
MAX_GET_MESSAGES = 1000
MAX_REPLY_BYTES = 8 * 1024 * 1024
GET_MESSAGES_RESULTS = metadata_pb2.GetMessagesResponse.RESULTS_FIELD_NUMBER
MISSING_RAW = "the raw message is missing from the blob store"


def _require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return value


async def _rechunk(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Chunks of at most CHUNK_SIZE, whatever size the blob store reads."""
    async for chunk in chunks:
        for start in range(0, len(chunk), CHUNK_SIZE):
            yield chunk[start:start + CHUNK_SIZE]


class MetadataServicer(metadata_pb2_grpc.MetadataServiceServicer):
    """mailgrid.v1.MetadataService over a MetadataStore and a BlobStore."""

    def __init__(self, store: MetadataStore, blobs: BlobStore,
                 settings: Settings | None = None) -> None:
        self.store = store
        self.blobs = blobs
        self.settings = settings or Settings()

    async def _bodies_from_raw(self, messages: Sequence[common_pb2.Message | None]) -> None:
        """Fills in the bodies of the messages whose bodies live only in their raw
        message. A raw message gone missing is a parse problem, not an error: the rest
        of the message is still there to show."""
        todo = [(m, raw) for m, raw in zip(messages, await self._raws(messages), strict=True)
                if m is not None and m.bodies_from_raw]
        if not todo:
            return
        settings = self.settings

        def parse() -> None:
            for message, raw in todo:
                if raw is None:
                    message.parse_problems.append(MISSING_RAW)
                else:
                    fill_bodies(settings, message, raw)

        await asyncio.to_thread(parse)

    async def _raws(self, messages: Sequence[common_pb2.Message | None]
                    ) -> list[bytes | None]:
        """The raw bytes of each message with bodies_from_raw (None for the others)."""
        keys = list({m.blob_key for m in messages if m is not None and m.bodies_from_raw})
        found = dict(zip(keys, await self.blobs.read_many(keys), strict=True)) if keys else {}
        return [found.get(m.blob_key) if m is not None and m.bodies_from_raw else None
                for m in messages]

    @rpc
    async def CreateUser(self, request: metadata_pb2.CreateUserRequest,
                         context: Context) -> metadata_pb2.CreateUserResponse:
        user = await self.store.create_user(_require(request.address, "address"),
                                            _require(request.password, "password"),
                                            request.quota_bytes)
        log.info("created user %s (%s)", user.user_id, user.address)
        return metadata_pb2.CreateUserResponse(user=user)

    @rpc
    async def GetUser(self, request: metadata_pb2.GetUserRequest,
                      context: Context) -> metadata_pb2.GetUserResponse:
        key = request.WhichOneof("key")
        if key == "user_id" and request.user_id:
            user = await self.store.get_user(request.user_id)
        elif key == "address" and request.address:
            user = await self.store.get_user_by_address(request.address)
        else:
            raise InvalidArgument("user_id or address is required")
        return metadata_pb2.GetUserResponse(user=user)

    @rpc
    async def Authenticate(self, request: metadata_pb2.AuthenticateRequest,
                           context: Context) -> metadata_pb2.AuthenticateResponse:
        user = await self.store.authenticate(request.address, request.password)
        return metadata_pb2.AuthenticateResponse(user=user)

    @rpc
    async def ListUsers(self, request: metadata_pb2.ListUsersRequest,
                        context: Context) -> metadata_pb2.ListUsersResponse:
        users, token = await self.store.list_users(page_size=request.page_size,
                                                   page_token=request.page_token)
        return metadata_pb2.ListUsersResponse(users=users, next_page_token=token)

    @rpc
    async def GetSenderLists(self, request: metadata_pb2.GetSenderListsRequest,
                             context: Context) -> metadata_pb2.GetSenderListsResponse:
        entries = await self.store.sender_lists(_require(request.user_id, "user_id"))
        return metadata_pb2.GetSenderListsResponse(entries=entries)

    @rpc
    async def UpdateSenderList(self, request: metadata_pb2.UpdateSenderListRequest,
                               context: Context) -> metadata_pb2.UpdateSenderListResponse:
        entries = await self.store.update_sender_list(
            _require(request.user_id, "user_id"), request.entry, request.remove)
        return metadata_pb2.UpdateSenderListResponse(entries=entries)

    @rpc
    async def ListFolders(self, request: metadata_pb2.ListFoldersRequest,
                          context: Context) -> metadata_pb2.ListFoldersResponse:
        folders = await self.store.list_folders(_require(request.user_id, "user_id"))
        return metadata_pb2.ListFoldersResponse(folders=folders)

    @rpc
    async def ListMessages(self, request: metadata_pb2.ListMessagesRequest,
                           context: Context) -> metadata_pb2.ListMessagesResponse:
        page = await self.store.list_messages(
            _require(request.user_id, "user_id"), _require(request.folder_id, "folder_id"),
            page_size=request.page_size, page_token=request.page_token,
            unread_only=request.unread_only)
        return metadata_pb2.ListMessagesResponse(messages=page.messages,
                                                 next_page_token=page.next_page_token)

    @rpc
    async def GetMessage(self, request: metadata_pb2.GetMessageRequest,
                         context: Context) -> metadata_pb2.GetMessageResponse:
        message = await self.store.get_message(_require(request.user_id, "user_id"),
                                               request.email_id)
        await self._bodies_from_raw([message])
        return metadata_pb2.GetMessageResponse(message=message)

    @rpc
    async def GetMessages(self, request: metadata_pb2.GetMessagesRequest,  # type: ignore[override]
                          context: Context) -> bytes:
        """A GetMessagesResponse, serialized (registered with_prebuilt_replies)."""
        if not 1 <= len(request.messages) <= MAX_GET_MESSAGES:
            raise InvalidArgument(f"ask for 1 to {MAX_GET_MESSAGES} messages")
        wanted = [(_require(m.user_id, "user_id"), m.email_id) for m in request.messages]
        messages = await self.store.get_messages(wanted)
        if request.bodies_as_raw:
            raws = await self._raws(messages)
        else:
            await self._bodies_from_raw(messages)
            raws = [None] * len(messages)
        results: list[bytes] = []
        size = 0
        for message, raw in zip(messages, raws, strict=True):
            result = metadata_pb2.GetMessagesResult(found=message is not None)
            if message is not None:
                result.message.CopyFrom(message)
                if raw is not None:
                    result.message.raw = raw
                elif message.bodies_from_raw and request.bodies_as_raw:
                    result.message.parse_problems.append(MISSING_RAW)
            results.append(result.SerializeToString())
            size += len(results[-1])
            if len(results) > 1 and size > MAX_REPLY_BYTES:
                results.pop()
                break  # the caller asks again for the rest
        # Each result serialized on its own and joined: megabytes of raw messages in one
        # reply message would serialize 30 times slower (see mailgrid.wire).
        return wire.records(GET_MESSAGES_RESULTS, results)

    @rpc_stream
    async def GetRawMessage(self, request: metadata_pb2.GetRawMessageRequest,
                            context: Context) -> AsyncIterator[metadata_pb2.GetRawMessageResponse]:
        message = await self.store.get_message(_require(request.user_id, "user_id"),
                                               request.email_id)
        async for chunk in _rechunk(self.blobs.open(message.blob_key)):
            yield metadata_pb2.GetRawMessageResponse(data=chunk)

    @rpc_stream
    async def GetAttachment(self, request: metadata_pb2.GetAttachmentRequest,
                            context: Context) -> AsyncIterator[metadata_pb2.GetAttachmentResponse]:
        message = await self.store.get_message(_require(request.user_id, "user_id"),
                                               request.email_id)
        found = [a for a in message.attachments if a.attachment_id == request.attachment_id]
        if not found:
            raise NotFound(f"no attachment {request.attachment_id!r}")
        chunks = _rechunk(self.blobs.open(found[0].blob_key))
        # Open the blob before answering, so a missing blob is an error, not a header.
        first = await anext(chunks, b"")
        yield metadata_pb2.GetAttachmentResponse(attachment=found[0], data=first)
        async for chunk in chunks:
            yield metadata_pb2.GetAttachmentResponse(data=chunk)

    @rpc
    async def UpdateMessage(self, request: metadata_pb2.UpdateMessageRequest,
                            context: Context) -> metadata_pb2.UpdateMessageResponse:
        summary = await self.store.update_message(
            _require(request.user_id, "user_id"), request.email_id,
            is_read=request.is_read if request.HasField("is_read") else None,
            is_starred=request.is_starred if request.HasField("is_starred") else None,
            folder=request.folder_id if request.HasField("folder_id") else None)
        return metadata_pb2.UpdateMessageResponse(message=summary)

    @rpc
    async def DeleteMessage(self, request: metadata_pb2.DeleteMessageRequest,
                            context: Context) -> metadata_pb2.DeleteMessageResponse:
        permanent = await self.store.delete_message(
            _require(request.user_id, "user_id"), request.email_id, request.permanent)
        return metadata_pb2.DeleteMessageResponse(permanent=permanent)

    @rpc
    async def StoreDelivery(self, request: metadata_pb2.StoreDeliveryRequest,
                            context: Context) -> metadata_pb2.StoreDeliveryResponse:
        _require(request.user_id, "user_id")
        _require(request.delivery_key, "delivery_key")
        # A message whose bytes are not stored would be unreadable: refuse it, unless
        # this is a repeat of a delivery stored before (its blobs may be gone since).
        for key in _blob_keys(request):
            if not await self.blobs.exists(key):
                seen = await self.store.delivered_email_id(request.user_id,
                                                           request.delivery_key)
                if seen is not None:
                    return metadata_pb2.StoreDeliveryResponse(email_id=seen, created=False)
                raise InvalidArgument(f"blob {key!r} is not in the blob store")
        stored = await self.store.store_delivery(request)
        if stored.created:
            log.info("stored %s for user %s (delivery %s)", stored.email_id,
                     request.user_id, request.delivery_key)
        return metadata_pb2.StoreDeliveryResponse(email_id=stored.email_id,
                                                  created=stored.created)


    @rpc
    async def StoreDeliveries(self, request: metadata_pb2.StoreDeliveriesRequest,
                              context: Context) -> metadata_pb2.StoreDeliveriesResponse:
        # The carried raw messages are made durable (one group commit) before any row
        # refers to them; a failure there fails the call, and the caller retries it all.
        refs = await self.blobs.put_many(list(request.blobs))
        stored_now = {ref.key for ref in refs}
        outcomes: list[metadata_pb2.StoreDeliveryResult | None] = []
        todo: list[tuple[int, metadata_pb2.StoreDeliveryRequest]] = []
        for batched in request.deliveries:
            try:
                delivery = await self._batched_request(batched, refs, stored_now)
            except MailgridError as err:
                outcomes.append(_failed(err))
            else:
                todo.append((len(outcomes), delivery))
                outcomes.append(None)
        results = await self.store.store_deliveries([d for _, d in todo])
        filed: set[str] = set()  # the carried blobs a filed copy refers to
        for (index, delivery), result in zip(todo, results, strict=True):
            if isinstance(result, MailgridError):
                outcomes[index] = _failed(result)
            else:
                if result.created:
                    filed.update(_blob_keys(delivery))
                outcomes[index] = metadata_pb2.StoreDeliveryResult(
                    stored=metadata_pb2.StoreDeliveryResponse(email_id=result.email_id,
                                                              created=result.created))
        # Bytes carried for copies that were all refused (a full mailbox, an unknown
        # user) would stay on disk unreferenced: the collector takes them once the grace
        # has passed and nothing refers to them (a retry puts and files them again; a
        # repeated copy's bytes are its first filing's, which note_orphan leaves alone).
        for key in stored_now - filed:
            await self.store.note_orphan(key)
        log.info("stored a batch of %d deliveries (%d blobs)", len(outcomes), len(refs))
        return metadata_pb2.StoreDeliveriesResponse(
            results=[outcome for outcome in outcomes if outcome is not None])

    async def _batched_request(self, batched: metadata_pb2.BatchedDelivery,
                               refs: list[BlobRef], stored_now: set[str]
                               ) -> metadata_pb2.StoreDeliveryRequest:
        """The delivery with its blob key filled in, checked as StoreDelivery checks."""
        delivery = batched.request
        _require(delivery.user_id, "user_id")
        _require(delivery.delivery_key, "delivery_key")
        if not delivery.blob_key:
            if batched.blob_index >= len(refs):
                raise InvalidArgument(f"blob_index {batched.blob_index} is not in blobs")
            ref = refs[batched.blob_index]
            delivery.blob_key = ref.key
            delivery.size = delivery.size or ref.size
        for key in _blob_keys(delivery):
            if key not in stored_now and not await self.blobs.exists(key):
                seen = await self.store.delivered_email_id(delivery.user_id,
                                                           delivery.delivery_key)
                if seen is None:
                    raise InvalidArgument(f"blob {key!r} is not in the blob store")
        return delivery


def _blob_keys(delivery: metadata_pb2.StoreDeliveryRequest) -> list[str]:
    return [delivery.blob_key, *(a.blob_key for a in delivery.parsed.attachments)]


def _failed(err: MailgridError) -> metadata_pb2.StoreDeliveryResult:
    return metadata_pb2.StoreDeliveryResult(code=err.grpc_code.value[0], message=err.detail)


class BlobServicer(metadata_pb2_grpc.BlobServiceServicer):
    """mailgrid.v1.BlobService: content-addressed bytes in 1 MiB chunks."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    @rpc
    async def PutBlob(self, request_iterator: AsyncIterator[metadata_pb2.PutBlobRequest],
                      context: Context) -> metadata_pb2.PutBlobResponse:
        async def chunks() -> AsyncIterator[bytes]:
            async for part in request_iterator:
                yield part.data

        ref = await self.blobs.put(chunks())
        return metadata_pb2.PutBlobResponse(blob_key=ref.key, size=ref.size)

    @rpc_stream
    async def GetBlob(self, request: metadata_pb2.GetBlobRequest,
                      context: Context) -> AsyncIterator[metadata_pb2.GetBlobResponse]:
        async for chunk in _rechunk(self.blobs.open(_require(request.blob_key, "blob_key"))):
            yield metadata_pb2.GetBlobResponse(data=chunk)
