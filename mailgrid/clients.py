"""Clients of mailgrid's gRPC services, raising mailgrid.errors instead of RPC errors.

Services reach each other only through these (or NATS subjects).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from mailgrid import wire
from mailgrid.errors import MailgridError, from_grpc
from mailgrid.grpcutil import CHUNK_SIZE, call, channel, stream
from mailgrid.v1 import (
    common_pb2,
    delivery_pb2,
    delivery_pb2_grpc,
    metadata_pb2,
    metadata_pb2_grpc,
)

# StoreDeliveriesRequest.blobs
STORE_DELIVERIES_BLOBS = metadata_pb2.StoreDeliveriesRequest.BLOBS_FIELD_NUMBER

# google.rpc.Code numbers back to grpc's enum, for per-item outcomes of batch calls.
_STATUS_BY_CODE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class MetadataClient:
    """MetadataService and BlobService of metadata_svc, over one channel."""

    def __init__(self, target: str, timeout: float = 10.0) -> None:
        self._channel: grpc.aio.Channel = channel(target)
        self._meta = metadata_pb2_grpc.MetadataServiceStub(self._channel)
        self._blobs = metadata_pb2_grpc.BlobServiceStub(self._channel)
        # StoreDeliveries with its request joined on the wire by hand (mailgrid.wire).
        self._store_deliveries: grpc.aio.UnaryUnaryMultiCallable[
            bytes, metadata_pb2.StoreDeliveriesResponse] = self._channel.unary_unary(
            "/mailgrid.v1.MetadataService/StoreDeliveries", request_serializer=None,
            response_deserializer=metadata_pb2.StoreDeliveriesResponse.FromString)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> MetadataClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # users

    async def create_user(self, address: str, password: str,
                          quota_bytes: int = 0) -> common_pb2.User:
        req = metadata_pb2.CreateUserRequest(address=address, password=password,
                                             quota_bytes=quota_bytes)
        reply = await call(self._meta.CreateUser(req, timeout=self.timeout))
        return reply.user

    async def get_user(self, *, user_id: str = "", address: str = "") -> common_pb2.User:
        req = (metadata_pb2.GetUserRequest(user_id=user_id) if user_id
               else metadata_pb2.GetUserRequest(address=address))
        reply = await call(self._meta.GetUser(req, timeout=self.timeout))
        return reply.user

    async def authenticate(self, address: str, password: str) -> common_pb2.User:
        req = metadata_pb2.AuthenticateRequest(address=address, password=password)
        reply = await call(self._meta.Authenticate(req, timeout=self.timeout))
        return reply.user

    async def list_users(self, *, page_size: int = 0, page_token: str = ""
                         ) -> metadata_pb2.ListUsersResponse:
        """One page of every user, ordered by user id."""
        req = metadata_pb2.ListUsersRequest(page_size=page_size, page_token=page_token)
        return await call(self._meta.ListUsers(req, timeout=self.timeout))

    # reading

    async def list_folders(self, user_id: str) -> list[common_pb2.Folder]:
        req = metadata_pb2.ListFoldersRequest(user_id=user_id)
        reply = await call(self._meta.ListFolders(req, timeout=self.timeout))
        return list(reply.folders)

    async def list_messages(self, user_id: str, folder_id: str, *, page_size: int = 0,
                            page_token: str = "", unread_only: bool = False
                            ) -> metadata_pb2.ListMessagesResponse:
        req = metadata_pb2.ListMessagesRequest(
            user_id=user_id, folder_id=folder_id, page_size=page_size,
            page_token=page_token, unread_only=unread_only)
        return await call(self._meta.ListMessages(req, timeout=self.timeout))

    async def get_message(self, user_id: str, email_id: str) -> common_pb2.Message:
        req = metadata_pb2.GetMessageRequest(user_id=user_id, email_id=email_id)
        reply = await call(self._meta.GetMessage(req, timeout=self.timeout))
        return reply.message

    async def get_messages(self, wanted: Iterable[tuple[str, str]], *,
                           bodies_as_raw: bool = False) -> list[common_pb2.Message | None]:
        """The messages (user id, email id) names, in order; None for each one missing.

        ``bodies_as_raw``: bodies that live in the raw message come as ``raw`` instead,
        for a caller that parses them (GetMessagesRequest.bodies_as_raw).
        """
        asked = [metadata_pb2.GetMessageRequest(user_id=user_id, email_id=email_id)
                 for user_id, email_id in wanted]
        found: list[common_pb2.Message | None] = []
        while len(found) < len(asked):  # a reply may stop early to stay small
            req = metadata_pb2.GetMessagesRequest(messages=asked[len(found):],
                                                  bodies_as_raw=bodies_as_raw)
            reply = await call(self._meta.GetMessages(req, timeout=self.timeout))
            found += [result.message if result.found else None for result in reply.results]
        return found

    async def raw_message(self, user_id: str, email_id: str) -> AsyncIterator[bytes]:
        req = metadata_pb2.GetRawMessageRequest(user_id=user_id, email_id=email_id)
        async for part in stream(self._meta.GetRawMessage(req, timeout=self.timeout)):
            yield part.data

    async def attachment(self, user_id: str, email_id: str, attachment_id: str
                         ) -> tuple[common_pb2.Attachment, AsyncIterator[bytes]]:
        """The attachment's description, and an iterator over its bytes."""
        req = metadata_pb2.GetAttachmentRequest(
            user_id=user_id, email_id=email_id, attachment_id=attachment_id)
        responses = stream(self._meta.GetAttachment(req, timeout=self.timeout))
        first = await anext(responses)

        async def body() -> AsyncIterator[bytes]:
            if first.data:
                yield first.data
            async for part in responses:
                yield part.data

        return first.attachment, body()

    # changing

    async def update_message(self, user_id: str, email_id: str, *,
                             is_read: bool | None = None, is_starred: bool | None = None,
                             folder_id: str | None = None) -> common_pb2.MessageSummary:
        req = metadata_pb2.UpdateMessageRequest(user_id=user_id, email_id=email_id)
        if is_read is not None:
            req.is_read = is_read
        if is_starred is not None:
            req.is_starred = is_starred
        if folder_id is not None:
            req.folder_id = folder_id
        reply = await call(self._meta.UpdateMessage(req, timeout=self.timeout))
        return reply.message

    async def delete_message(self, user_id: str, email_id: str,
                             permanent: bool = False) -> bool:
        req = metadata_pb2.DeleteMessageRequest(user_id=user_id, email_id=email_id,
                                                permanent=permanent)
        reply = await call(self._meta.DeleteMessage(req, timeout=self.timeout))
        return reply.permanent

    async def store_delivery(self, req: metadata_pb2.StoreDeliveryRequest
                             ) -> metadata_pb2.StoreDeliveryResponse:
        return await call(self._meta.StoreDelivery(req, timeout=self.timeout))

    async def store_deliveries(self, blobs: Sequence[bytes],
                               deliveries: Sequence[metadata_pb2.BatchedDelivery]
                               ) -> list[metadata_pb2.StoreDeliveryResponse | MailgridError]:
        """StoreDeliveries of ``deliveries``, carrying the raw messages ``blobs``: one
        outcome per delivery, in order: stored, or the error it failed with."""
        request = (wire.records(STORE_DELIVERIES_BLOBS, blobs)
                   + metadata_pb2.StoreDeliveriesRequest(deliveries=deliveries)
                   .SerializeToString())
        reply = await call(self._store_deliveries(request, timeout=self.timeout))
        return [result.stored if result.HasField("stored")
                else from_grpc(_STATUS_BY_CODE.get(result.code, grpc.StatusCode.UNKNOWN),
                               result.message)
                for result in reply.results]

    async def sender_lists(self, user_id: str) -> list[common_pb2.SenderListEntry]:
        req = metadata_pb2.GetSenderListsRequest(user_id=user_id)
        reply = await call(self._meta.GetSenderLists(req, timeout=self.timeout))
        return list(reply.entries)

    async def update_sender_list(self, user_id: str, entry: common_pb2.SenderListEntry,
                                 remove: bool = False) -> list[common_pb2.SenderListEntry]:
        req = metadata_pb2.UpdateSenderListRequest(user_id=user_id, entry=entry,
                                                   remove=remove)
        reply = await call(self._meta.UpdateSenderList(req, timeout=self.timeout))
        return list(reply.entries)

    # blobs

    async def put_blob(self, data: bytes | Iterable[bytes]) -> metadata_pb2.PutBlobResponse:
        """Stores bytes (given whole or as chunks) and returns their content address."""
        chunks = _chunks(data) if isinstance(data, bytes | bytearray | memoryview) else data

        async def requests() -> AsyncIterator[metadata_pb2.PutBlobRequest]:
            for chunk in chunks:
                yield metadata_pb2.PutBlobRequest(data=bytes(chunk))

        return await call(self._blobs.PutBlob(requests(), timeout=self.timeout * 6))

    async def get_blob(self, blob_key: str) -> bytes:
        req = metadata_pb2.GetBlobRequest(blob_key=blob_key)
        parts = [part.data async for part in
                 stream(self._blobs.GetBlob(req, timeout=self.timeout * 6))]
        return b"".join(parts)


class DeliveryClient:
    """DeliveryService of delivery_svc."""

    def __init__(self, target: str, timeout: float = 60.0) -> None:
        self._channel: grpc.aio.Channel = channel(target)
        self._stub = delivery_pb2_grpc.DeliveryServiceStub(self._channel)
        # Generous: a submission reads, parses and files the whole message before it answers.
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> DeliveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit_message(self, req: delivery_pb2.SubmitMessageRequest
                             ) -> delivery_pb2.SubmitMessageResponse:
        """Durable when it returns; repeating it with the same submission_id is harmless."""
        return await call(self._stub.SubmitMessage(req, timeout=self.timeout))

    async def queue_stats(self) -> list[delivery_pb2.QueueStats]:
        reply = await call(self._stub.GetQueueStats(delivery_pb2.GetQueueStatsRequest(),
                                                    timeout=self.timeout))
        return list(reply.queues)


def _chunks(data: bytes | bytearray | memoryview) -> Iterable[bytes]:
    view = memoryview(data)
    if not view:
        yield b""
    for start in range(0, len(view), CHUNK_SIZE):
        yield bytes(view[start:start + CHUNK_SIZE])
